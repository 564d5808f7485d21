"""`mtp-mlx convert` through typer's CliRunner, and the one-line error contract of the CLI."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mtp_mlx import cli
from mtp_mlx.loading import convert as convert_mod
from mtp_mlx.loading import load

from .loading_helpers import ROOT, fixture_root

runner = CliRunner()


@pytest.fixture(scope="module")
def fx():
    return fixture_root()


def run(*args):
    return runner.invoke(cli.app, ["convert", *map(str, args)])


def assert_one_line_error(result, expect):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtp-mlx: error: "), result.stderr
    assert expect in lines[0]
    assert "Traceback" not in result.output


def test_convert_quantized_pair(fx, tmp_path):
    out = tmp_path / "mlx"
    result = run("--model", fx / "moe" / "target", "--drafter", fx / "moe" / "assistant",
                 "--mlx-path", out, "-q", "--q-bits", 8, "--drafter-q-bits", 4, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    pair = load(str(out), str(out / "assistant"))
    assert pair.target.layers[0].self_attn.q_proj.bits == 8
    assert pair.drafter.pre_projection.bits == 4


def test_quantize_flag_defaults_to_4_bits(fx, tmp_path):
    result = run("--hf-path", fx / "dense" / "target", "-o", tmp_path / "o", "-q")
    assert result.exit_code == 0, result.output
    assert load(str(tmp_path / "o")).target.layers[0].mlp.up_proj.bits == 4


def test_missing_model_path(tmp_path):
    assert_one_line_error(run("--model", tmp_path / "nope", "--mlx-path", tmp_path / "o"), "does not exist")
    assert not (tmp_path / "o").exists()


def test_swapped_pair(fx, tmp_path):
    result = run("--model", fx / "e2b" / "assistant", "--drafter", fx / "e2b" / "target", "-o", tmp_path / "o")
    assert_one_line_error(result, "swapped")


def test_mismatched_pair(fx, tmp_path):
    result = run("--model", fx / "e2b" / "target", "--drafter", fx / "moe" / "assistant", "-o", tmp_path / "o")
    assert_one_line_error(result, "does not fit target")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(fx, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    assert_one_line_error(run("--model", fx / "dense" / "target", "-o", out), "--force")
    result = run("--model", fx / "dense" / "target", "-o", out, "--force")
    assert result.exit_code == 0, result.output


def test_bad_bits(fx, tmp_path):
    assert_one_line_error(run("--model", fx / "dense" / "target", "-o", tmp_path / "o", "--q-bits", 7),
                          "bits 7 is not supported")


def test_ctrl_c_exits_130(fx, tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "convert", interrupt)
    result = run("--model", fx / "dense" / "target", "-o", tmp_path / "o")
    assert result.exit_code == 130
    assert "Traceback" not in result.output


def test_module_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_mlx", "convert", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"mtp-mlx: error: model path '{tmp_path / 'missing'}' does not exist: pass a local folder "
        "or a Hugging Face repo id (owner/name)"
    ]


def test_help():
    result = runner.invoke(cli.app, ["convert", "--help"])
    assert result.exit_code == 0 and "--q-bits" in result.output and "--drafter" in result.output
