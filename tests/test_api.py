"""Python API: streaming responses, statistics, chat template and raw tokenization, stop
strings that span tokens and rounds."""

import pytest

import mtp_mlx
from mtp_mlx.decoding.engine import _StopFilter


@pytest.fixture(scope="module")
def agree(fixtures):
    return mtp_mlx.load(str(fixtures / "agree" / "target"), str(fixtures / "agree" / "assistant"))


def test_stream_generate_responses(agree):
    ids = mtp_mlx.format_prompt(agree.tokenizer, "def f(x):", raw=True)
    rs = list(mtp_mlx.stream_generate(agree, ids, max_tokens=40, num_draft_tokens=3))
    last = rs[-1]
    assert last.generation_tokens == sum(len(r.tokens) for r in rs) == 40
    assert last.finish_reason == "length"
    assert last.drafted > 0 and last.target_forwards == len(rs) - 1
    assert last.accepted == sum(sum(r.from_draft) for r in rs)
    assert 1.0 <= last.tokens_per_forward <= 4.0 and 0 <= last.acceptance_rate <= 1
    text = "".join(r.text for r in rs)
    assert text == agree.tokenizer.decode([t for r in rs for t in r.tokens])
    assert mtp_mlx.generate(agree, ids, max_tokens=40, num_draft_tokens=3) == text


def test_raw_keeps_bos_and_chat_template_wraps_turns(agree):
    tok = agree.tokenizer
    raw = mtp_mlx.format_prompt(tok, "hello", raw=True)
    assert raw[0] == tok.bos_token_id
    chat = mtp_mlx.format_prompt(tok, "hello", system="be brief")
    text = tok.decode(chat)
    assert "<|turn>user" in text and "hello" in text and text.rstrip().endswith("<|turn>model")


def test_stop_string_across_tokens_and_rounds(agree):
    ids = mtp_mlx.format_prompt(agree.tokenizer, "import os", raw=True)
    full = mtp_mlx.generate(agree, ids, max_tokens=60, num_draft_tokens=4)
    # A stop string that starts inside one token and ends inside a later one.
    start = len(full) // 2
    stop = full[start : start + 5]
    assert len(stop) == 5
    rs = list(mtp_mlx.stream_generate(agree, ids, max_tokens=60, num_draft_tokens=4, stop=[stop]))
    shown = "".join(r.text for r in rs)
    assert shown == full[: full.index(stop)]
    assert rs[-1].finish_reason == "stop"


def test_stop_filter_holds_back_partial_matches():
    f = _StopFilter(["END"])
    assert f.feed("abcE", final=False) == ("ab", False)  # "cE" might start "END"
    assert f.feed("N", final=False) == ("c", False)  # "EN" might still start "END"
    assert f.feed("Dxyz", final=False) == ("", True)
    g = _StopFilter(["END"])
    assert g.feed("abEN", final=True) == ("abEN", False)
