"""The draft-length policy, driven by scripted acceptance and round-cost curves (no model, no MLX).

A simulated round: each row drafts its K, accepts draft j with its scripted conditional
probability, and the round takes the scripted cost of (batch size, the round's K).
"""

import json
import random

import pytest

from mtp_mlx.decoding.policy import DraftPolicy, bucket_of, expected_tokens, prior_key


def flat(b, k):  # verify cost barely grows with width (bandwidth-bound): 210 + 2.6 w ms
    return (210 + 2.6 * (k + 1)) / 1000


def steep(b, k):  # compute-bound: 30 + 19 w ms
    return (30 + 19 * (k + 1)) / 1000


class Sim:
    """Rows with scripted acceptance, a scripted cost, an optional stall schedule."""

    def __init__(self, policy, cost, seed=0):
        self.policy, self.cost = policy, cost
        self.rng = random.Random(seed)
        self.rows = {}  # uid -> acceptance (a float or a function of the round number)
        self.round = 0
        self.stalls = {}  # round -> factor
        self.plans = []  # per round: {uid: K}
        self.time = 0.0
        self.tokens = 0

    def rate(self, uid):
        a = self.rows[uid]
        return a(self.round) if callable(a) else a

    def step(self, caps=None, fixed=None):
        uids = list(self.rows)
        caps = caps or {u: 8 for u in uids}
        ks = self.policy.plan(uids, caps, fixed=fixed)
        assert set(ks) == set(uids)
        assert all(0 <= ks[u] <= caps[u] for u in uids)
        accepted = {}
        for u, k in ks.items():
            n = 0
            while n < k and self.rng.random() < self.rate(u):
                n += 1
            accepted[u] = n
        seconds = self.cost(len(uids), max(ks.values())) * self.stalls.get(self.round, 1.0)
        self.policy.observe(ks, accepted, seconds)
        self.plans.append(ks)
        self.time += seconds
        self.tokens += sum(1 + n for n in accepted.values())
        self.round += 1
        return ks

    def run(self, rounds, **kw):
        return [self.step(**kw) for _ in range(rounds)]


def round_k(plans):
    return [max(p.values()) for p in plans]


def test_expected_tokens_and_buckets():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([1.0] * 8, 8) == 9.0
    assert [bucket_of(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def test_flat_cost_selects_a_deep_k():
    sim = Sim(DraftPolicy(), flat)
    sim.rows = {1: 0.8}
    sim.run(400)
    late = round_k(sim.plans[-100:])
    assert sorted(late)[50] >= 5, late
    assert sim.policy.summary()["parked_fraction"] < 0.02


def test_steep_cost_selects_a_shallow_k():
    sim = Sim(DraftPolicy(), steep)
    sim.rows = {1: 0.8}
    sim.run(400)
    late = round_k(sim.plans[-100:])
    assert 1 <= sorted(late)[50] <= 4, late
    # the best fixed K under this curve is 2 or 3 (E(K)/C(K) = 28.1 / 27.8 per s): we are close to it
    best_fixed = max(expected_tokens([0.8] * 8, k) / steep(1, k) for k in range(9))
    ours = sum(expected_tokens([0.8] * 8, k) / steep(1, k) for k in late) / len(late)
    assert ours >= 0.93 * best_fixed  # near-tied depths swap with the noise of the acceptance estimate


def test_never_pays_parks_within_a_bounded_number_of_rounds():
    sim = Sim(DraftPolicy(), steep)
    sim.rows = {1: 0.05}
    sim.run(400)
    ks = round_k(sim.plans)
    drafting = [i for i, k in enumerate(ks) if k > 0]
    # after at most 12 rounds only probes draft: they follow the 8, 16, 32, ... schedule (the
    # first probe takes K=1's second cost sample, so the next comes after 8 rounds again)
    late = [i for i in drafting if i >= 12]
    assert len(late) <= 7, drafting
    assert ks[12:19] == [0] * 7
    gaps = [b - a for a, b in zip(late, late[1:])]
    assert gaps[:4] == [16, 32, 64, 128], drafting
    summary = sim.policy.summary()
    assert summary["parked_fraction"] > 0.9
    assert summary["reason"].startswith("parked")
    assert sim.policy.cost(1, 0) == pytest.approx(steep(1, 0))  # K = 0 truly measured


def test_a_single_3x_stall_does_not_unpark():
    # drafting a little worse than plain (a = 0.25 at 30 + 19 w: K=1 gives 1.25 tokens in 1.39x the time)
    sim = Sim(DraftPolicy(probe_first=10_000, probe_max=10_000), steep)
    sim.rows = {1: 0.25}
    sim.run(60)
    assert round_k(sim.plans[-20:]) == [0] * 20
    for stalled in range(60, 70):  # one 3x stall on a plain round, then on any single round after it
        sim.stalls = {stalled: 3.0}
        sim.run(30)
        assert round_k(sim.plans[-30:]) == [0] * 30, stalled


def test_a_single_3x_stall_does_not_flip_a_drafting_choice():
    for a, cost in ((1.0, steep), (0.8, steep), (0.8, flat)):
        sim = Sim(DraftPolicy(probe_first=10_000, probe_max=10_000), cost, seed=3)
        sim.rows = {1: a}
        sim.run(200)
        before = sim.policy.cost(1, round_k(sim.plans)[-1])
        sim.stalls = {sim.round: 3.0}
        sim.run(1)
        assert sim.policy.cost(1, round_k(sim.plans)[-1]) == pytest.approx(before, rel=1e-9)
    sim = Sim(DraftPolicy(probe_first=10_000, probe_max=10_000), steep, seed=3)
    sim.rows = {1: 1.0}  # deterministic acceptance: the choice never moves once climbed
    sim.run(200)
    k = round_k(sim.plans)[-1]
    assert k >= 6 and round_k(sim.plans[-20:]) == [k] * 20
    sim.stalls = {sim.round: 3.0}
    sim.run(40)
    assert round_k(sim.plans[-40:]) == [k] * 40


def test_acceptance_drift_is_tracked():
    # while parked, drift is seen only through probes: recovery takes a few probe intervals
    sim = Sim(DraftPolicy(probe_max=64), steep, seed=1)
    sim.rows = {1: lambda r: 0.9 if r < 300 or r >= 600 else 0.05}
    sim.run(1200)
    ks = round_k(sim.plans)
    assert sorted(ks[200:300])[50] >= 3  # drafting while the drafter agrees
    park = next(i for i in range(300, 600) if ks[i:i + 7] == [0] * 7)
    assert park < 345, park  # parked soon after it stops agreeing
    assert sum(k > 0 for k in ks[park:600]) <= 8  # probes only
    back = next(i for i in range(600, 1200) if ks[i:i + 20].count(0) == 0)
    assert back < 600 + 6 * 64, back  # found by a probe
    assert sorted(ks[back + 100:back + 200])[50] >= 3


def test_heterogeneous_rows_get_different_k():
    # 40 + 12 w ms: a row at 0.1 would lose alone (1.1 tokens for 1.23x the time), one at 0.9 wins deep
    sim = Sim(DraftPolicy(), lambda b, k: (40 + 12 * (k + 1)) / 1000, seed=2)
    sim.rows = {1: 0.9, 2: 0.1}
    sim.run(300)
    late = sim.plans[-100:]
    assert sorted(p[1] for p in late)[50] >= 2
    assert sorted(p[2] for p in late)[50] == 0  # rides along at K = 0 (probes aside)


def test_rows_leaving_and_joining_mid_batch():
    policy = DraftPolicy()
    sim = Sim(policy, flat, seed=4)
    sim.rows = {1: 0.9, 2: 0.9, 3: 0.9, 4: 0.9}
    sim.run(150)
    for uid in (2, 3):
        del sim.rows[uid]
        policy.forget(uid)
    policy.forget(99)  # unknown rows are ignored
    sim.run(100)
    assert sorted(round_k(sim.plans[-50:]))[25] >= 4
    assert all(set(p) == {1, 4} for p in sim.plans[-100:])
    # a row the policy forgot, still in one last observe, is counted for cost only
    policy.observe({1: 3, 2: 3}, {1: 3, 2: 1}, flat(2, 3))
    # a new row starts from the shared prior: it drafts deep at once
    sim.rows[5] = 0.9
    ks = sim.step()
    assert ks[5] >= 4
    # batch sizes map to their buckets
    assert {b for b, _, _ in policy.summary()["trace"]} == {4, 2, 3}


def test_probe_counts_follow_the_schedule():
    sim = Sim(DraftPolicy(probe_first=8, probe_max=64), steep)
    sim.rows = {1: 0.02}
    sim.run(700)
    ks = round_k(sim.plans)
    parked_at = next(i for i in range(2, len(ks)) if ks[i] == 0)  # after two plain rounds that measure C[1][0]
    assert parked_at <= 6
    probes = [i for i, k in enumerate(ks) if k > 0 and i >= parked_at]
    assert probes[0] == parked_at + 7  # the 8th round of the park
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    # the first probe takes K=1's second cost sample (something new): the interval stays at 8
    assert gaps[:4] == [8, 16, 32, 64], (parked_at, probes)
    assert all(g == 64 for g in gaps[4:]), gaps
    assert sim.policy.summary()["probes"] == len(probes)


def test_never_plans_more_than_one_position_past_what_was_measured():
    policy = DraftPolicy(trust=4)
    sim = Sim(policy, flat)
    sim.rows = {1: 1.0}
    deepest = 0
    for _ in range(60):
        ks = sim.step()
        assert ks[1] <= deepest + 1
        seen = policy.state()["acceptance"]
        while deepest < 8 and seen[deepest][2] >= 4:
            deepest += 1
    assert ks[1] == 8


def test_fixed_rows_count_in_the_round_but_are_not_chosen():
    sim = Sim(DraftPolicy(), steep)
    sim.rows = {1: 0.05, 2: 0.05}
    plans = sim.run(100, fixed={2: 5})
    assert all(p[2] == 5 for p in plans)
    # row 1 is free to draft up to 5 (the round costs K=5 anyway) or to ride along
    assert all(p[1] in (0, 1, 2, 3, 4, 5) for p in plans)


def test_caps_are_respected_and_zero_caps_mean_plain():
    sim = Sim(DraftPolicy(), flat)
    sim.rows = {1: 0.9, 2: 0.9}
    sim.run(100, caps={1: 2, 2: 8})
    assert all(p[1] <= 2 for p in sim.plans)
    ks = sim.step(caps={1: 0, 2: 0})
    assert ks == {1: 0, 2: 0}


def test_the_guard_parks_a_model_that_is_wrong():
    # A frozen, optimistic cost table (cost_alpha=0): the model believes K=4 costs what plain does.
    prior = {"version": 1, "max_draft": 8, "costs": {"1": {str(k): [0.049, 50] for k in range(9)}},
             "acceptance": [[20.0, 50.0, 50]] * 8}
    policy = DraftPolicy(prior=prior, cost_alpha=0.0, guard_window=32, guard_backoff=64)
    sim = Sim(policy, steep)
    sim.rows = {1: 0.4}
    sim.run(40)
    ks = round_k(sim.plans)
    assert ks[:20].count(0) == 0  # the model drafts
    # The plain round was never timed in this process, so before parking the guard re-measures
    # it: three plain rounds, then one drafting round to decide on, then the park.
    first = ks.index(0)
    assert first == 32 and ks[first:first + 3] == [0, 0, 0] and ks[first + 3] > 0
    assert policy.summary()["refresh_rounds"] == 3
    summary = policy.summary()
    assert summary["guard_trips"] == 1
    trip = first + 4
    assert ks[trip:] == [0] * (40 - trip)
    sim.run(1)
    if round_k(sim.plans)[-1] == 0:
        assert "parked by the guard" in policy.summary()["reason"]
    sim.run(400)
    ks = round_k(sim.plans)
    assert sum(k > 0 for k in ks[trip:trip + 64]) <= 3  # parked for the back-off, probes aside (8, 16, 32)
    # the model still insists, so the guard trips again after 32 drafting rounds, and parks twice as long
    assert policy.summary()["guard_trips"] >= 2
    second = next(i for i in range(trip + 33, len(ks)) if ks[i] == 0 and all(k > 0 for k in ks[i - 32:i]))
    assert 64 + 32 - 2 <= second - trip <= 64 + 32 + 2
    assert ks[second:second + 4] == [0, 0, 0, 8]  # the plain round was last timed before the window: re-measured
    assert sum(k > 0 for k in ks[second + 4:second + 4 + 128]) <= 4
    assert policy.summary()["parked_fraction"] > 0.6


def test_worst_case_loss_stays_within_the_documented_bound():
    # never pays: K=1 costs r1 = 68/49 of a plain round and adds 0.05 tokens
    policy = DraftPolicy(probe_max=512)
    sim = Sim(policy, steep, seed=5)
    sim.rows = {1: 0.05}
    sim.run(300)  # warm-up
    t0, n0 = sim.time, sim.tokens
    sim.run(3000)
    plain_time = (sim.tokens - n0) * steep(1, 0)
    loss = 1 - plain_time / (sim.time - t0)
    r1 = steep(1, 1) / steep(1, 0)
    # the bound's probe term is (r1 - 1) / P at the cap; the schedule is still climbing here: <= 1 per 64
    assert loss <= (r1 - 1) / 64 + 1e-9, loss


def test_state_round_trips_and_seeds_a_new_policy():
    sim = Sim(DraftPolicy(), flat)
    sim.rows = {1: 0.9}
    sim.run(200)
    state = json.loads(json.dumps(sim.policy.state()))
    fresh = DraftPolicy(prior=state)
    assert fresh.cost(1, 0) == pytest.approx(sim.policy.cost(1, 0))
    assert fresh.acceptance()[:3] == pytest.approx(sim.policy.acceptance()[:3])
    ks = fresh.plan([7], {7: 8})  # no cold start: drafts deep from the first round
    assert ks[7] >= 5
    assert DraftPolicy.from_state(state).state()["costs"] == state["costs"]
    assert DraftPolicy(prior={"version": 0}).cost(1, 0) is None  # an unknown layout is ignored


def test_prior_key_names_every_part():
    key = prior_key("mac|arm64", "0.32.4", "/m/target|/m/assistant", "q4g64")
    for part in ("mac|arm64", "0.32.4", "/m/target|/m/assistant", "q4g64"):
        assert part in key
    assert key != prior_key("mac|arm64", "0.32.5", "/m/target|/m/assistant", "q4g64")


def test_cold_start_measures_plain_first_and_costs_extrapolate():
    policy = DraftPolicy()
    assert policy.plan([1], {1: 8}) == {1: 0}
    assert "measuring the plain round cost" in policy.summary()["reason"]
    policy.observe({1: 0}, {1: 0}, 1.0)  # first sample at a new shape: warm-up, dropped
    assert policy.cost(1, 0) is None
    policy.observe({1: 0}, {1: 0}, 0.05)
    assert policy.cost(1, 0) == pytest.approx(0.05)
    assert policy.cost(1, 2) == pytest.approx(0.05 * (1 + 2 * 0.2))
    policy.observe({1: 2}, {1: 2}, 9.0)  # dropped (first at K=2)
    policy.observe({1: 2}, {1: 2}, 0.07)
    assert policy.cost(1, 1) == pytest.approx(0.06)  # interpolated
    assert policy.cost(1, 4) == pytest.approx(0.09)  # the last slope, extended
    policy.observe({1: 0, 2: 0}, {}, 0.2)
    policy.observe({1: 0, 2: 0}, {}, 0.1)
    assert policy.cost(2, 2) == pytest.approx(0.1 * 0.07 / 0.05)  # bucket 1's shape
    c = policy.cost(1, 0)
    policy.observe({1: 0}, {1: 0}, 0.05)
    policy.observe({1: 0}, {1: 0}, 100.0)  # one stall: the median of three ignores it
    assert policy.cost(1, 0) == pytest.approx(c)
    policy.observe({1: 0}, {1: 0}, 100.0)  # a run of stalls moves the estimate by a bounded step
    assert policy.cost(1, 0) == pytest.approx(c * (1 + 0.3 * 0.25))


def test_a_round_without_a_cost_sample_still_teaches_acceptance():
    policy = DraftPolicy()
    for _ in range(3):
        policy.observe({1: 0}, {1: 0}, 0.05)
    policy.observe({1: 2, 2: 2}, {1: 2, 2: 0}, None)  # the round also ran a prefill slice
    assert policy.cost(2, 2) is None and policy.cost(1, 2) == pytest.approx(0.05 * 1.4)
    assert policy.acceptance(1)[0] > policy.acceptance()[0] > policy.acceptance(2)[0]
    assert policy.summary()["rounds"] == 4


def test_noisy_costs_are_made_non_decreasing_in_k():
    policy = DraftPolicy()
    for k, seconds in ((0, 0.09), (0, 0.09), (1, 0.06), (1, 0.06), (2, 0.12), (2, 0.12)):
        policy.observe({1: k}, {1: 0}, seconds)
    assert policy.cost(1, 0) == pytest.approx(0.075) == policy.cost(1, 1)  # pooled: K=1 is no cheaper
    assert policy.cost(1, 2) == pytest.approx(0.12)


def test_drafts_next_foretells_probes_and_drafting_rounds():
    """The engine queues a plain forward ahead only when the policy does not expect the next
    round to draft; the guess matches the next plan except where the choice itself changes
    (parked -> drafting or back), and always foretells a probe."""
    for cost, acc in [(steep, 0.05), (flat, 0.9), (steep, 0.6)]:
        sim = Sim(DraftPolicy(probe_first=8, probe_max=64), cost, seed=2)
        sim.rows = {0: acc}
        guesses, drafted = [], []
        for _ in range(400):
            guesses.append(sim.policy.drafts_next(1))
            drafted.append(max(sim.step().values()) > 0)
        probes = [r for r in range(1, 399) if drafted[r] and not drafted[r - 1] and not drafted[r + 1]]
        assert all(guesses[r] for r in probes)
        misses = [r for r in range(400) if guesses[r] != drafted[r]]
        assert all(drafted[r] != drafted[r - 1] for r in misses if r > 0), (cost.__name__, acc, misses)
        assert len(misses) <= 10
    assert not DraftPolicy().drafts_next(1)  # nothing measured: plain rounds first


def test_stalls_while_drafting_do_not_trip_the_guard():
    """Drafting pays (about 1.2x plain); every fifth round stalls 3x (another process on the
    machine). The stalls would slow plain decoding as much, so the guard must not park."""
    sim = Sim(DraftPolicy(probe_first=10_000, probe_max=10_000), steep, seed=4)
    sim.rows = {0: 0.7}
    sim.stalls = {r: 3.0 for r in range(0, 400, 5)}
    sim.run(400)
    assert sim.policy.summary()["guard_trips"] == 0
    assert sum(k > 0 for k in round_k(sim.plans)[50:]) >= 340


def test_a_machine_that_slows_down_while_drafting_does_not_trip_the_guard():
    """Drafting pays about 1.35x plain. From round 120 the machine runs 1.45x slower, plain
    decoding as much as drafting. The plain round was last timed before that, so a guard that
    trusted that time would see drafting at about 0.94x plain and park for 32 rounds (checked
    below by disabling the re-measure); instead it re-measures the plain round (three plain
    rounds) and keeps drafting."""
    def run(refresh):
        sim = Sim(DraftPolicy(probe_first=10_000, probe_max=10_000), steep, seed=4)
        sim.rows = {0: 0.8}
        sim.stalls = {r: 1.45 for r in range(120, 600)}
        if not refresh:
            original = sim.policy._guard_step

            def no_refresh(bucket, state, *a):
                state.refreshed = True  # as if this episode had already re-measured
                return original(bucket, state, *a)

            sim.policy._guard_step = no_refresh
        sim.run(600)
        return sim

    with_refresh, without = run(True), run(False)
    assert without.policy.summary()["guard_trips"] >= 1
    assert round_k(without.plans)[120:].count(0) >= 32
    s = with_refresh.policy.summary()
    assert s["guard_trips"] == 0 and s["refresh_rounds"] == 3
    assert round_k(with_refresh.plans)[120:].count(0) <= 6
    assert with_refresh.tokens / with_refresh.time > without.tokens / without.time


class CutSim(Sim):
    """Rounds that may cut on the drafter's confidence. Each draft is accepted with the row's
    rate; the drafter is confident in an accepted draft with probability ``c_hit`` and in a
    rejected one with ``c_miss``. A cut round keeps each row's drafts up to its first
    unconfident one and costs ``cut_cost(batch, planned K, widest kept K)``. Uncut rounds
    report the confidences when the policy asks (0.9 for a confident draft, 0.3 otherwise)."""

    def __init__(self, policy, cost, cut_cost, c_hit=0.95, c_miss=0.1, seed=0):
        super().__init__(policy, cost, seed)
        self.cut_cost, self.c_hit, self.c_miss = cut_cost, c_hit, c_miss
        self.cut = []  # per round: whether it cut
        self.asked = []  # per round: whether the policy asked for the drafts' confidences

    def step(self, caps=None, fixed=None):
        uids = list(self.rows)
        ks = self.policy.plan(uids, caps or {u: 8 for u in uids}, fixed=fixed)
        p_min = self.policy.cut()
        accepted, kept, draws_of = {}, {}, {}
        for u, k in ks.items():
            draws = draws_of[u] = []
            for _ in range(k):
                ok = self.rng.random() < self.rate(u)
                draws.append((ok, self.rng.random() < (self.c_hit if ok else self.c_miss)))
            keep = next((j for j, (_, sure) in enumerate(draws) if not sure), k) if p_min is not None else k
            accepted[u] = next((j for j, (ok, _) in enumerate(draws[:keep]) if not ok), keep)
            kept[u] = keep
        self.asked.append(p_min is None and self.policy.wants_confidence())
        if p_min is None:
            seconds = self.cost(len(uids), max(ks.values()))
            conf = None
            if self.asked[-1]:  # what the drafter said of each draft
                conf = {u: [0.9 if sure else 0.3 for _, sure in d] for u, d in draws_of.items()}
            self.policy.observe(ks, accepted, seconds, confidence=conf)
        else:
            seconds = self.cut_cost(len(uids), max(ks.values()), max(kept.values()))
            self.policy.observe(kept, accepted, seconds, planned_ks=ks)
        self.cut.append(p_min is not None)
        self.plans.append(ks)
        self.time += seconds
        self.tokens += sum(1 + n for n in accepted.values())
        self.round += 1
        return ks


def _steep_cut(sync):
    """A cut round: the planned drafts (4 ms each), a verify as wide as the kept drafts, a sync."""
    return lambda b, k, kept: (30 + 4 * k + 15 * (kept + 1) + sync) / 1000


def _steep_drafting(b, k):  # the same pieces without the sync: 30 + 4 k + 15 (k + 1) ms
    return (30 + 4 * k + 15 * (k + 1)) / 1000


def test_cutting_on_confidence_becomes_the_mode_where_it_pays():
    """A calibrated drafter and a steep verify: cut rounds skip verify positions that would be
    rejected, for a 1 ms sync. The policy tries cutting, measures it faster, keeps cutting and
    commits more tokens per second than a policy that never cuts."""
    sim = CutSim(DraftPolicy(), _steep_drafting, _steep_cut(sync=1.0))
    sim.rows = {1: 0.7}
    sim.run(1500)
    drafting = [c for c, p in zip(sim.cut, sim.plans) if max(p.values())]
    assert len(drafting) > 1000
    assert sum(drafting) / len(drafting) > 0.8, sum(drafting)
    assert sim.policy.summary()["cut_mode"] == {1: True}
    assert sim.policy.summary()["cut_fraction"] > 0.5
    never = CutSim(DraftPolicy(cut_first=0), _steep_drafting, _steep_cut(sync=1.0))
    never.rows = {1: 0.7}
    never.run(1500)
    assert sim.tokens / sim.time > 1.05 * never.tokens / never.time


def test_cutting_that_does_not_pay_is_only_tried_on_the_back_off_schedule():
    """Same drafter, but reading the confidences costs 40 ms: cutting is tried in bursts of
    ``cut_burst`` rounds whose spacing doubles, and never becomes the mode. The run loses
    little against a policy that never cuts."""
    sim = CutSim(DraftPolicy(), _steep_drafting, _steep_cut(sync=40.0))
    sim.rows = {1: 0.7}
    sim.run(2000)
    p = sim.policy
    assert p.summary()["cut_mode"] == {1: False}
    trials = sum(sim.cut)
    # bursts of 4 after 16, 32, ..., 512 drafting rounds: at most 4 * 9 rounds in 2000
    assert 4 <= trials <= 36, trials
    assert sum(sim.cut[-500:]) <= 8
    # the confidences are read only in the cut_window (16) uncut rounds before each decision
    assert sum(sim.asked) <= 16 * 10, sum(sim.asked)
    assert 16 <= sum(sim.asked[-1000:]) <= 16 * 3
    never = CutSim(DraftPolicy(cut_first=0), _steep_drafting, _steep_cut(sync=40.0))
    never.rows = {1: 0.7}
    never.run(2000)
    assert sum(never.cut) == 0
    assert sim.tokens / sim.time >= 0.97 * never.tokens / never.time


def test_cut_rounds_are_no_cost_sample_of_their_k_and_teach_only_kept_drafts():
    p = DraftPolicy()
    p.observe({1: 0}, {1: 0}, 0.01)
    p.observe({1: 0}, {1: 0}, 0.01)
    cost, rates = p.cost(1, 3), p.acceptance(1)
    for _ in range(5):
        p.plan([1], {1: 3})
        p.observe({1: 1}, {1: 1}, 0.5, planned_ks={1: 3})  # kept 1 of 3, accepted it, slow round
    assert p.cost(1, 3) == cost
    assert p.acceptance(1)[0] > rates[0]
    assert p._prior_seen[:3] == [5, 0, 0]  # the kept draft's position only, never the dropped ones


def test_cutting_is_not_tried_where_the_uncut_rounds_say_it_cannot_pay():
    """A drafter that is never confident (its drafts are accepted all the same): a cut would
    keep nothing, so even at the cost of rounds as deep as what it keeps (a plain round) it
    would lose to drafting. The policy never spends a round trying it."""
    sim = CutSim(DraftPolicy(), _steep_drafting, _steep_cut(sync=1.0), c_hit=0.0, c_miss=0.0)
    sim.rows = {1: 0.95}
    sim.run(1500)
    assert sum(sim.cut) == 0
    assert sum(max(p.values()) for p in sim.plans[-200:]) > 200  # it drafts


def test_a_bucket_where_nothing_could_pay_probes_at_the_longest_interval():
    """A round of depth k costs more than k + 1 plain rounds (a CPU at batch 4): even perfect
    acceptance would not pay, so once parked the policy probes only every ``probe_max`` rounds
    (those probes still re-measure the costs); ``drafts_next`` foretells exactly those."""
    def dear(b, k):  # a plain round 10 ms, each draft position 12 ms more
        return (10 + 12 * k) / 1000

    sim = Sim(DraftPolicy(probe_first=8, probe_max=128), dear)
    sim.rows = {1: 0.9}
    foretold = []
    for _ in range(700):
        foretold.append(sim.policy.drafts_next(1))
        sim.step()
    ks = round_k(sim.plans)
    late = [i for i, k in enumerate(ks) if k > 0 and i >= 40]
    assert late, ks[:40]
    assert all(b - a == 128 for a, b in zip(late, late[1:])), late
    assert len(late) <= 6
    assert all(foretold[i] for i in late)
    assert sum(foretold[40:]) <= len(late) + 1


class _NoParkedMemo(DraftPolicy):
    """The policy with its parked memo turned off: every round recomputes the choice."""

    def _choose_parked(self, uids, caps, fixed, bucket, state):
        return self._choose(uids, caps, fixed, bucket)


class _CountingChoose(DraftPolicy):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.chosen = 0

    def _choose(self, *args):
        self.chosen += 1
        return super()._choose(*args)


def test_the_parked_memo_never_changes_a_plan():
    # Two policies fed the same rounds, one reusing its parked choices and one recomputing every
    # round, must plan the same K for every row in every round: through parking, plain costs that
    # drift up (past the memo's bound) and down, probes, acceptance that changes, rows that join
    # and leave, budgets that run out, fixed-K rows and batch sizes that change bucket.
    rng = random.Random(11)
    memo, fresh = _CountingChoose(), _NoParkedMemo()
    rows = {1: 0.1, 2: 0.2}
    next_uid, plain, parked_rounds = 3, 0.006, 0
    for r in range(3000):
        if r % 150 == 0:  # a row joins or leaves, acceptance changes
            if len(rows) > 1 and rng.random() < 0.5:
                gone = rng.choice(sorted(rows))
                del rows[gone]
                memo.forget(gone)
                fresh.forget(gone)
            else:
                rows[next_uid] = rng.choice([0.05, 0.3, 0.9])
                next_uid += 1
        plain = min(0.012, max(0.004, plain * rng.uniform(0.97, 1.035)))  # drifts either way
        uids = sorted(rows)
        # each row's budget runs out every 50 rounds (caps 8, ..., 1, 0), and now and then a cap jumps
        caps = {u: rng.choice([8, 2, 0]) if r % 97 == 0 else max(0, min(8, 45 - (r + 13 * u) % 50)) for u in uids}
        fixed = {uids[0]: 1} if r % 500 < 20 else {}
        ks = memo.plan(uids, caps, fixed)
        assert fresh.plan(uids, caps, fixed) == ks, r
        assert memo.drafts_next(len(uids)) == fresh.drafts_next(len(uids)), r
        k = max(ks.values())
        parked_rounds += k == 0
        accepted = {}
        for u in uids:
            n = 0
            while n < ks[u] and rng.random() < rows[u]:
                n += 1
            accepted[u] = n
        seconds = plain * (1 + 0.9 * k) * len(uids) ** 0.3 * rng.uniform(0.97, 1.03)
        memo.observe(ks, accepted, seconds)
        fresh.observe(ks, accepted, seconds)
    assert memo.summary()["trace"] == fresh.summary()["trace"]
    assert parked_rounds > 1000  # the memo was exercised: most rounds parked...
    assert memo.chosen < 0.6 * 3000  # ...and most of those reused a choice (recomputing every round: over 3000)


def test_a_parked_choice_is_recomputed_once_the_plain_round_gets_dearer():
    # Parked while a round at K = 1 costs 2x a plain one; as plain rounds get dearer (drafting
    # costs stay), drafting starts to pay: the memo must let go exactly when recomputing would.
    def cost(plain):
        return lambda b, k: plain if k == 0 else 0.0114 + 0.001 * k

    memo = _CountingChoose(probe_first=10_000, probe_max=10_000)
    results = []
    for policy in (memo, _NoParkedMemo(probe_first=10_000, probe_max=10_000)):
        sim = Sim(policy, cost(0.006), seed=5)
        sim.rows = {1: 0.6}
        sim.run(40)  # measures K = 0 and 1, then parks
        for step in range(90):
            sim.cost = cost(0.006 * 1.01**step)
            sim.run(5)
        results.append(round_k(sim.plans))
    assert results[0] == results[1]
    ks = results[0]
    assert ks[10:300] == [0] * 290 and ks[-20:] != [0] * 20, ks
    assert memo.chosen < 300  # the parked stretch mostly reused its choice


def test_a_parked_choice_is_recomputed_when_a_cap_grows():
    # A round at K = 1 costs 2x a plain one (parked: 1.95 tokens for it), deeper rounds barely
    # more (K = 2 pays). A row capped at K = 1 parks; once its cap grows, it must draft again.
    def cost(b, k):
        return 0.01 if k == 0 else 0.02 + 0.0001 * k

    prior = {"version": 1, "max_draft": 8, "acceptance": [[19.0, 20.0, 20]] * 3,
             "costs": {"1": {str(k): [cost(1, k), 10] for k in range(4)}}}
    results = []
    for policy in (DraftPolicy(prior=prior), _NoParkedMemo(prior=prior)):
        sim = Sim(policy, cost, seed=2)
        sim.rows = {1: 0.95}
        sim.run(40, caps={1: 1})
        sim.run(10)
        results.append(round_k(sim.plans))
    assert results[0] == results[1]
    assert results[0][10:40].count(0) >= 28 and min(results[0][-5:]) >= 2, results[0]  # parked but for a probe
