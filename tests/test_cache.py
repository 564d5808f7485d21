"""Cache invariants: rollback is exact, O(1), correct after sliding rings wrap, and raises
rather than trim less than asked."""

import mlx.core as mx
import pytest

from mtp_mlx.cache import LayerCache
from mtp_mlx.errors import MtpError
from mtp_mlx.ops.attention import visibility_mask


def _kv(start, n, d=4):
    # Each entry's value encodes its position, so reads can be checked exactly.
    x = mx.broadcast_to(mx.arange(start, start + n, dtype=mx.float32)[None, None, :, None], (1, 1, n, d))
    return x, x


def _visible_positions(view, q):
    m = visibility_mask(mx.array([[q]]), view.pos, 0)[0, 0, 0]
    return sorted(int(p) for p, ok in zip(view.pos[0].tolist(), m.tolist()) if ok)


@pytest.mark.parametrize("window", [0, 6])
def test_write_trim_rewrite_keeps_exact_history(window):
    c = LayerCache(window=window, max_draft=4)
    c.update(*_kv(0, 11))  # prefill longer than the window
    for step in range(40):
        start = c.offsets[0]
        view = c.update(*_kv(start, 5))  # verify chunk of K+1 = 5
        # Every query of the chunk sees exactly its causal (windowed) history.
        for i in range(5):
            q = start + i
            m = visibility_mask(mx.array([[q]]), view.pos, window)[0, 0, 0]
            vals = sorted(int(v) for v, ok in zip(view.keys[0, 0, :, 0].tolist(), m.tolist()) if ok)
            lo = max(0, q - window + 1) if window else 0
            assert vals == list(range(lo, q + 1))
        keep = 1 + step % 5  # the bonus plus 0..4 accepted drafts
        c.trim(5 - keep)
        assert c.offsets[0] == start + keep
    # After many wraps the committed view holds positions < offset only.
    view = c.view()
    vis = _visible_positions(view, c.offsets[0] - 1)
    lo = max(0, c.offsets[0] - window) if window else 0
    assert [p for p in vis if p >= lo] == list(range(lo, c.offsets[0]))
    assert max(vis) == c.offsets[0] - 1


def test_trim_more_than_written_raises():
    c = LayerCache(window=0, max_draft=4)
    c.update(*_kv(0, 3))
    c.update(*_kv(3, 2))
    with pytest.raises(MtpError, match="cannot trim 3"):
        c.trim(3)
    assert c.offsets == [5]  # nothing trimmed on failure


def test_sliding_trim_beyond_slack_raises():
    c = LayerCache(window=6, max_draft=2)
    c.update(*_kv(0, 20))
    with pytest.raises(MtpError, match="sized for 2 drafts"):
        c.trim(3)


def test_trim_is_o1_no_copy():
    c = LayerCache(window=0, max_draft=4)
    c.update(*_kv(0, 300))
    keys = c.keys
    c.trim(3)
    assert c.keys is keys and c.offsets == [297]


def test_rolled_back_ring_slots_are_invisible():
    c = LayerCache(window=6, max_draft=4)
    c.update(*_kv(0, 20))
    c.update(*_kv(20, 5))
    c.trim(4)  # keep position 20 only
    view = c.view()
    # Even a query far in the future sees no rejected entry (21..24).
    assert not any(p in (21, 22, 23, 24) for p in _visible_positions(view, 100))


def _rows_kv(starts, n, d=4):
    # Row b's entries encode (b, position) as 1000 * b + position.
    x = mx.stack([1000 * b + mx.arange(s, s + n, dtype=mx.float32) for b, s in enumerate(starts)])
    x = mx.broadcast_to(x[:, None, :, None], (len(starts), 1, n, d))
    return x, x


@pytest.mark.parametrize("window", [0, 6])
def test_ragged_rows_trim_independently(window):
    """Each row keeps its own accepted count: no row sees another's entries or its own
    rejected drafts, and nothing is clamped to the batch minimum."""
    rows = 3
    parts = []
    for b, P in enumerate([4, 9, 15]):  # rows prefilled separately, then stacked
        c = LayerCache(window=window, max_draft=4)
        k, v = _rows_kv([0], P)
        c.update(k + 1000 * b, v + 1000 * b)
        parts.append(c)
    c = LayerCache.stack(parts)
    for step in range(25):
        starts = list(c.offsets)
        c.update(*_rows_kv(starts, 5))
        keep = [1 + (step + b) % 5 for b in range(rows)]
        c.trim([5 - k for k in keep])
        assert c.offsets == [s + k for s, k in zip(starts, keep)]
    view = c.view()
    for b in range(rows):
        q = c.offsets[b] - 1
        m = visibility_mask(mx.array([[q]] * rows), view.pos, window)[b, 0, 0]
        vals = sorted(int(x) for x, ok in zip(view.keys[b, 0, :, 0].tolist(), m.tolist()) if ok)
        lo = max(0, q - window + 1) if window else 0
        assert vals == [1000 * b + p for p in range(lo, q + 1)]


def test_select_drops_rows():
    c = LayerCache.stack([_filled(3), _filled(7), _filled(5)])
    c.select([0, 2])
    assert c.offsets == [3, 5] and c.keys.shape[0] == 2


def _filled(n):
    c = LayerCache(window=0, max_draft=4)
    c.update(*_kv(0, n))
    return c
