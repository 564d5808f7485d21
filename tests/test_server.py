"""``mtp-mlx serve`` driven by the official ``openai`` client against live servers on 127.0.0.1.

Two servers on the bundled demo pair, both on ephemeral ports and torn down at the end:
- ``server``: in this process (engine thread + uvicorn thread), max batch 8, prefix cache on;
- ``small``: ``python -m mtp_mlx serve`` in a subprocess (the command line), max batch 1 and
  max queue 1, prefix cache off: the queue-overflow test and the cold reference for the prefix cache.
Greedy unless a test says otherwise; outputs are compared with solo runs on an idle server.
"""

import asyncio
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from mtp_mlx.demo import DEMO_DRAFTER, DEMO_TARGET
from mtp_mlx.server.app import BackgroundServer, ServerConfig, create_app
from mtp_mlx.server.cli import DEMO_MODEL_ID, build_worker

MODEL = DEMO_MODEL_ID
LONG_CHAT = "Write a function that parses a URL."   # the demo pair answers at length
SHORT_CHAT = "def read_config(path):"               # ... and briefly (ends with its end-of-turn token)
ENDLESS = "class Parser:\n    def __init__(self, text):\n"  # a raw prefix the demo target never ends
TIMEOUT = 60


@pytest.fixture(scope="module")
def server():
    worker = build_worker(str(DEMO_TARGET), str(DEMO_DRAFTER), max_batch=8, prompt_cache_bytes=64 << 20).start()
    try:
        assert worker.wait_ready(120), "the demo pair did not load in 120 s"
        config = ServerConfig(model_id=MODEL, max_batch=8, max_queue=16, num_draft="auto", has_drafter=True,
                              default_max_tokens=64)
        with BackgroundServer(create_app(worker, config)) as srv:
            yield srv
    finally:
        worker.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def aclient_factory(server):
    return lambda: openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def small():
    """The command-line server with one row and one waiting slot; yields its base URL."""
    cmd = [sys.executable, "-m", "mtp_mlx", "serve", "--host", "127.0.0.1", "--port", "0", "--max-batch", "1",
           "--max-queue", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, found = [], threading.Event()
    url = []

    def read():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(120):
            pytest.fail("the command-line server did not start in 120 s:\n" + "".join(lines))
        yield url[0]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 32)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def spec(mode, k=None):
    s = {"mode": mode} if k is None else {"mode": mode, "num_draft_tokens": k}
    return {"extra_body": {"speculative": s}}


def text_of(resp):
    return resp.choices[0].message.content


def metric(url, name) -> float:
    body = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^mtp_mlx_{name} (\S+)$", body, re.M)
    assert m, f"/metrics has no mtp_mlx_{name}:\n{body}"
    return float(m.group(1))


def wait_for(cond, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# ---- streaming and the basics --------------------------------------------------------------------

def test_stream_equals_non_stream_and_ends_with_done(client, server):
    whole = chat(client, LONG_CHAT, max_tokens=40)
    chunks = list(chat(client, LONG_CHAT, max_tokens=40, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text_of(whole)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 40
    # The raw event stream ends with [DONE] after the finish chunk.
    body = {"model": MODEL, "messages": [{"role": "user", "content": SHORT_CHAT}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"finish_reason":"length"' in events[-2]


def test_greedy_with_drafter_equals_without(client):
    off = chat(client, LONG_CHAT, max_tokens=40, **spec("off"))
    assert off.model_extra["speculative"]["drafted"] == 0
    for mode, k in (("on", 1), ("on", 5), ("auto", None)):
        on = chat(client, LONG_CHAT, max_tokens=40, **spec(mode, k))
        assert text_of(on) == text_of(off), (mode, k)
        if mode == "on":
            assert on.model_extra["speculative"]["drafted"] > 0
            assert on.model_extra["speculative"]["num_draft_tokens"] == k


def test_max_tokens_is_exact_with_finish_length(client):
    for n in (1, 7, 17):
        r = client.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=n, temperature=0,
                                      **spec("on", 6))
        assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"
    r = chat(client, LONG_CHAT, max_completion_tokens=9, max_tokens=None)
    assert r.usage.completion_tokens == 9 and r.choices[0].finish_reason == "length"


def test_stop_string_spanning_two_tokens_is_cut(client):
    base = chat(client, LONG_CHAT, max_tokens=48, logprobs=True)
    text = text_of(base)
    toks = [t.token for t in base.choices[0].logprobs.content]
    assert "".join(toks) == text
    stop = expected = None
    for i in range(3, len(toks) - 1):  # a string made of the end of token i and the start of token i+1
        a, b = toks[i], toks[i + 1]
        if len(a) >= 2 and len(b) >= 2 and "bytes:" not in a + b:
            cut = len("".join(toks[: i + 1])) - 2
            if text.find(a[-2:] + b[:2]) == cut:
                stop, expected = a[-2:] + b[:2], text[:cut]
                break
    assert stop is not None, f"no two-token stop string found in {toks}"
    r = chat(client, LONG_CHAT, max_tokens=48, stop=[stop])
    assert text_of(r) == expected and r.choices[0].finish_reason == "stop"
    streamed = list(chat(client, LONG_CHAT, max_tokens=48, stop=stop, stream=True, **spec("on", 3)))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_usage_chunk_only_with_include_usage(client):
    whole = chat(client, SHORT_CHAT, max_tokens=12)
    plain = list(chat(client, SHORT_CHAT, max_tokens=12, stream=True))
    assert all(c.usage is None and c.choices for c in plain)
    counted = list(chat(client, SHORT_CHAT, max_tokens=12, stream=True, stream_options={"include_usage": True},
                        logprobs=True, top_logprobs=1))
    assert all(c.usage is None and c.choices for c in counted[:-1])
    # Streamed logprobs: one entry per token, in order, spelling the text.
    lps = [t for c in counted[:-1] if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(lps) == whole.usage.completion_tokens and "".join(t.token for t in lps) == text_of(whole)
    last = counted[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


# ---- batching ------------------------------------------------------------------------------------

def test_seeded_sampling_same_alone_and_among_four(aclient_factory):
    async def one(c, seed):
        r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG_CHAT}],
                                            max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return text_of(r)

    async def main():
        c = aclient_factory()
        alone = await one(c, 11)
        together = await asyncio.gather(*(one(c, s) for s in (11, 12, 13, 14)))
        await c.close()
        return alone, together

    alone, together = asyncio.run(main())
    assert together[0] == alone
    assert len(set(together)) > 1, "four different seeds gave one text"


def test_requests_joining_mid_generation_equal_their_solo_runs(client, aclient_factory):
    solo_a = text_of(chat(client, LONG_CHAT, max_tokens=64))
    solo_b = text_of(chat(client, SHORT_CHAT, max_tokens=16))
    solo_c = text_of(chat(client, "class Stack:", max_tokens=16, **spec("on", 2)))

    async def main():
        c = aclient_factory()
        started, a_done = asyncio.Event(), []

        async def run_a():
            parts, n = [], 0
            stream = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": LONG_CHAT}], max_tokens=64, temperature=0,
                stream=True)
            async for chunk in stream:
                parts.append(chunk.choices[0].delta.content or "")
                n += 1
                if n == 3:
                    started.set()
            a_done.append(True)
            return "".join(parts)

        async def joiner(content, **kw):
            await started.wait()
            r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                max_tokens=16, temperature=0, **kw)
            return text_of(r), bool(a_done)

        a, (b, a_done_b), (cc, a_done_c) = await asyncio.gather(
            run_a(), joiner(SHORT_CHAT), joiner("class Stack:", **spec("on", 2)))
        await c.close()
        return a, b, cc, a_done_b and a_done_c

    a, b, cc, a_finished_first = asyncio.run(main())
    assert not a_finished_first, "the long request ended before the joiners: they did not join mid-generation"
    assert (a, b, cc) == (solo_a, solo_b, solo_c)


def test_closing_a_stream_frees_its_row_and_spares_the_others(client, server, aclient_factory):
    solo = text_of(chat(client, LONG_CHAT, max_tokens=32))

    async def main():
        c = aclient_factory()
        other = asyncio.ensure_future(c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": LONG_CHAT}], max_tokens=32, temperature=0))
        stream = await c.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=2000, temperature=0,
                                            stream=True)
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.close()
        r = await other
        await c.close()
        return text_of(r)

    assert asyncio.run(main()) == solo
    # The 2000-token row would run for tens of seconds; cancelled, it leaves at a round boundary.
    wait_for(lambda: metric(server.url, "running_rows") == 0 and metric(server.url, "requests_in_flight") == 0,
             what="the closed stream's row to leave")
    # A non-streamed request whose client gives up is cancelled too (the server polls for it).
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=2000, temperature=0)
    wait_for(lambda: metric(server.url, "running_rows") == 0 and metric(server.url, "requests_in_flight") == 0,
             what="the abandoned request's row to leave")


def test_concurrent_requests_report_their_own_counters(aclient_factory):
    async def main():
        c = aclient_factory()
        rs = await asyncio.gather(
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG_CHAT}],
                                      max_tokens=24, temperature=0, **spec("on", 4)),
            c.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=16, temperature=0, **spec("on", 2)))
        await c.close()
        return rs

    rs = asyncio.run(main())
    stats = [r.model_extra["speculative"] for r in rs]
    assert stats[0] != stats[1]
    for r, s in zip(rs, stats):
        assert 0 <= s["accepted"] <= s["drafted"] and s["rounds"] > 0
        assert s["mean_acceptance_length"] == pytest.approx(1 + s["accepted"] / s["rounds"], abs=1e-5)
        # The histogram counts the rounds that drafted (K > 0): the last round of a budget drafts none.
        assert sum(s["acceptance_histogram"].values()) == s["rounds"] - s["draft_length_histogram"].get("0", 0)
        assert sum(s["draft_length_histogram"].values()) == s["rounds"]
        assert r.model_extra["timings"]["draft_n"] == s["drafted"]
        assert r.model_extra["timings"]["draft_n_accepted"] == s["accepted"]
        assert r.model_extra["timings"]["predicted_n"] == r.usage.completion_tokens
    assert max(int(k) for k in stats[1]["draft_length_histogram"]) <= 2


# ---- logprobs --------------------------------------------------------------------------------------

def test_logprobs_equal_with_and_without_drafter(client):
    kw = dict(max_tokens=32, logprobs=True, top_logprobs=5)
    on, off = chat(client, LONG_CHAT, **kw, **spec("on", 3)), chat(client, LONG_CHAT, **kw, **spec("off"))
    assert on.model_extra["speculative"]["drafted"] > 0
    a, b = on.choices[0].logprobs.content, off.choices[0].logprobs.content
    assert len(a) == len(b) == 32
    assert bytes(x for t in a for x in t.bytes).decode() == text_of(on)
    for x, y in zip(a, b):
        assert x.token == y.token and abs(x.logprob - y.logprob) <= 1e-4
        assert x.token == x.top_logprobs[0].token  # greedy picks the target's most likely token
        assert x.logprob <= 0 and len(x.top_logprobs) == 5
        assert [t.token for t in x.top_logprobs] == [t.token for t in y.top_logprobs]
        assert all(abs(p.logprob - q.logprob) <= 1e-4 for p, q in zip(x.top_logprobs, y.top_logprobs))
        tops = [t.logprob for t in x.top_logprobs]
        assert tops == sorted(tops, reverse=True) and x.logprob >= tops[-1] - 1e-6


def test_completions_legacy_logprobs_token_ids_and_models(client):
    r = client.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=12, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    assert all(len(d) <= 2 and max(d.values()) >= v - 1e-6 for d, v in zip(lp.top_logprobs, lp.token_logprobs))
    # Token ids are served as given (the text prompt above tokenized with its BOS).
    ids = r.usage.prompt_tokens
    from mtp_mlx.loading import load_tokenizer

    tok_ids = list(load_tokenizer(DEMO_TARGET).encode(ENDLESS))
    assert len(tok_ids) == ids
    r2 = client.completions.create(model=MODEL, prompt=tok_ids, max_tokens=12, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


# ---- prefix cache ------------------------------------------------------------------------------------

def test_second_turn_reports_cached_tokens_and_equals_a_cold_run(client, small):
    first = [{"role": "user", "content": LONG_CHAT}]
    reply = text_of(client.chat.completions.create(model=MODEL, messages=first, max_tokens=24, temperature=0))
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "class Stack:"}]
    warm = client.chat.completions.create(model=MODEL, messages=second, max_tokens=24, temperature=0)
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    assert warm.model_extra["timings"]["cache_n"] == warm.usage.prompt_tokens_details.cached_tokens
    cold_client = openai.OpenAI(base_url=small + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    cold = cold_client.chat.completions.create(model=MODEL, messages=second, max_tokens=24, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert text_of(warm) == text_of(cold)


# ---- errors ------------------------------------------------------------------------------------------

def test_unsupported_and_bad_fields_are_400_in_openai_shape(client, server):
    cases = [dict(n=2), dict(temperature=-1), dict(logprobs=True, top_logprobs=50), dict(top_p=0),
             dict(extra_body={"tools": [{"type": "function", "function": {"name": "f"}}]}),
             dict(extra_body={"response_format": {"type": "json_object"}}), dict(presence_penalty=0.5),
             dict(extra_body={"speculative": {"mode": "sometimes"}}), dict(max_tokens=0)]
    for kw in cases:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, SHORT_CHAT, **{"max_tokens": 4, **kw})
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", kw
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):  # longer than the demo target's 8192 positions
        client.completions.create(model=MODEL, prompt=[5] * 9000, max_tokens=2)
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ', timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # The server is unharmed: a normal request still works and nothing is left in flight.
    assert chat(client, SHORT_CHAT, max_tokens=3).usage.completion_tokens == 3
    assert metric(server.url, "requests_in_flight") == 0


def test_queue_overflow_is_503_with_retry_after(small):
    c = openai.OpenAI(base_url=small + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    streams = []
    try:
        for _ in range(2):  # one running row, one waiting: the server is full
            streams.append(c.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=2000, temperature=0,
                                                stream=True))
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=2, temperature=0)
        assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "queue_full"
    finally:
        for s in streams:
            s.close()
    # Closing the streams frees both slots.
    wait_for(lambda: metric(small, "requests_in_flight") == 0, what="the closed streams to free their slots")
    r = c.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_engine_fault_fails_its_requests_and_the_server_lives_on():
    """An exception inside engine.step answers 500 (OpenAI shape) and the next request is served."""
    from mtp_mlx.decoding.engine import Engine
    from mtp_mlx.loading import load
    from mtp_mlx.server.worker import EngineWorker

    class FaultOnce(Engine):  # the real engine, made to fail once after a marked request arrives
        marked = failed = False

        def submit(self, request):
            FaultOnce.marked |= request.max_tokens == 13
            return super().submit(request)

        def step(self):
            if FaultOnce.marked and not FaultOnce.failed:
                FaultOnce.failed = True
                raise RuntimeError("injected fault")
            return super().step()

    worker = EngineWorker(lambda: load(str(DEMO_TARGET), str(DEMO_DRAFTER)), lambda pair: FaultOnce(pair)).start()
    try:
        assert worker.wait_ready(120)
        config = ServerConfig(model_id=MODEL, max_batch=2, max_queue=2, num_draft="auto", has_drafter=True,
                              default_max_tokens=16)
        with BackgroundServer(create_app(worker, config)) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
            with pytest.raises(openai.InternalServerError) as e:
                c.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=13, temperature=0)
            assert e.value.body["code"] == "engine_error" and "injected fault" in e.value.body["message"]
            assert c.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=5).usage.completion_tokens == 5
            assert metric(srv.url, "engine_faults_total") == 1 and metric(srv.url, "requests_in_flight") == 0
    finally:
        worker.close()


def test_health_and_metrics(server, client):
    chat(client, SHORT_CHAT, max_tokens=2)
    h = httpx.get(server.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == MODEL
    body = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("running_rows", "queued_rows", "generated_tokens_total", "drafted_tokens_total",
                 "accepted_tokens_total", "rounds_total", "requests_in_flight"):
        assert re.search(rf"^# TYPE mtp_mlx_{name} (gauge|counter)$", body, re.M), name
    assert re.search(r'^mtp_mlx_requests_total\{endpoint="chat",code="200"\} [1-9]', body, re.M)


# ---- request parsing without a server ---------------------------------------------------------------

def test_parsing_rules():
    from mtp_mlx.server.protocol import ApiError, num_draft_for, parse_chat, parse_completion, sampling_defaults

    msgs = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "hi"}]
    p = parse_chat({"messages": msgs, "max_completion_tokens": 5, "stop": "x", "seed": -1, "top_k": -1})
    assert p.messages[0] == {"role": "system", "content": "be brief"}
    assert (p.max_tokens, p.stop, p.sampling.top_k, p.sampling.temperature) == (5, ["x"], 0, 1.0)
    assert p.sampling.seed is not None and p.logprobs is None
    # Unset sampling fields take the checkpoint's recommendations; set ones win.
    d = sampling_defaults({"temperature": 0.7, "top_k": 64, "do_sample": True})
    assert d == {"temperature": 0.7, "top_k": 64}
    q = parse_chat({"messages": msgs, "top_k": 8}, d)
    assert (q.sampling.temperature, q.sampling.top_k) == (0.7, 8)
    assert parse_completion({"prompt": ["one text"]}).text == "one text"
    assert parse_completion({"prompt": [[1, 2, 3]], "logprobs": 0}).prompt == [1, 2, 3]
    # Draft length per request: off -> 0; K fixes it; "on" without K never gets the controller's zero.
    spec = lambda s: parse_chat({"messages": msgs, "speculative": s})  # noqa: E731
    assert num_draft_for(spec({"mode": "off"}), "auto", True) == 0
    assert num_draft_for(spec({"num_draft_tokens": 3}), "auto", True) == 3
    assert num_draft_for(spec({"mode": "on"}), "auto", True) == 4
    assert num_draft_for(spec({"mode": "auto"}), 2, True) == 2
    assert num_draft_for(spec({"mode": "auto"}), 0, False) == 0
    bad = [
        ({"messages": msgs, "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
        ({"messages": msgs, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": msgs, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": msgs, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": msgs, "temperature": "hot"}, "temperature"),
        ({"messages": msgs, "max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"messages": msgs, "speculative": {"mode": "off", "num_draft_tokens": 2}}, "speculative.num_draft_tokens"),
        ({"messages": msgs, "speculative": {"num_draft_tokens": 9}}, "speculative.num_draft_tokens"),
        ({"messages": msgs, "tool_choice": "auto"}, "tool_choice"),
        ({"messages": msgs, "frequency_penalty": 1}, "frequency_penalty"),
        ({"messages": []}, "messages"),
    ]
    for body, param in bad:
        with pytest.raises(ApiError) as e:
            parse_chat(body)
        assert e.value.status == 400 and e.value.param == param, body
    for body, param in [({"prompt": ["a", "b"]}, "prompt"), ({"prompt": ""}, "prompt"),
                        ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "best_of": 2}, "best_of"),
                        ({}, "prompt")]:
        with pytest.raises(ApiError) as e:
            parse_completion(body)
        assert e.value.param == param, body
    with pytest.raises(ApiError):
        num_draft_for(spec({"mode": "on"}), 0, False)  # no drafter loaded


def test_serve_command_rejects_bad_flags_in_one_line():
    from typer.testing import CliRunner

    from mtp_mlx.cli import app

    for args, word in ((["--max-batch", "9"], "--max-batch"), (["--num-draft-tokens", "0"], "--num-draft-tokens"),
                       (["--max-queue", "-1"], "--max-queue"), (["--port", "70000"], "--port")):
        r = CliRunner().invoke(app, ["serve", *args])
        assert r.exit_code == 1 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
