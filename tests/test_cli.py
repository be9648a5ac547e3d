"""The `pyrajax` command line: the demo on the embedded model and the pyramid plot."""
from __future__ import annotations

from pyrajax.cli import main


def test_demo_answers_and_reports_kv(capsys, smol_dir):
    rc = main(["demo", "--checkpoint", str(smol_dir), "--cache", "full", "budget-256", "paper",
               "--max-new-tokens", "12", "--prompt", "What is the capital of France?"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[full]" in out and "Paris" in out and "[paper]" in out
    assert "[budget-256] (= full)" in out  # a short chat fits under the floor: the full cache's answer
    table = out[out.index("KV allocated"):]
    assert "full" in table and "100.0%" in table and "budget-256" in table


def test_plot_pyramid_writes_png(tmp_path, capsys):
    out = tmp_path / "pyramid.png"
    assert main(["plot-pyramid", "--cache", "full", "paper", "budget-0.45", "--layers", "32", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["plot-pyramid", "--cache", "pyramid", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown cache preset 'pyramid'" in capsys.readouterr().err
