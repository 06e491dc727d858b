"""CPU checks of bench/scale.py's ``cost`` (scripts/gpu-check runs it on an 8B-shaped block on the GPU)."""

from __future__ import annotations

import argparse
import sys

import pytest

from bench import scale


def test_cost_times_every_calibration_phase_and_projects_from_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(scale.SHAPES, "tiny", {"hidden": 64, "intermediate": 128, "heads": 2, "kv_heads": 1,
                                               "blocks": 3})
    args = argparse.Namespace(shapes=["tiny"], device="cpu", compute_dtype="float32", samples=2, seqlen=16,
                              epochs=(1, 1), threads=1)
    [row] = scale.cost(args)
    phases = row["phases_seconds"]
    assert set(phases) == {"prepare", "stage1", "gptq codes", "router fit", "stage2"}
    # Rounded to 0.01 s, the tiny block's training stages may read 0; its codes and Hessian pass do not.
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["prepare"] > 0 and phases["gptq codes"] > 0
    # The phases split the block's time between them (each rounded to 0.01 s).
    assert sum(phases.values()) == pytest.approx(row["block_seconds"], abs=0.05 + 0.01 * len(phases))
    # The projection keeps the token-independent phases and scales the stages up to 128 x 2048 tokens, 2 + 20 epochs.
    fixed = phases["prepare"] + phases["gptq codes"] + phases["router fit"]
    assert row["projected_block_minutes"] * 60 > fixed + 20 * phases["stage2"]
    assert row["projected_model_hours"] == pytest.approx(row["projected_block_minutes"] * 3 / 60, abs=0.01)


def test_an_unknown_shape_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["scale.py", "cost", "--shapes", "smollm2,llama-4"])
    with pytest.raises(SystemExit) as exit_info:
        scale.main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown shape 'llama-4'" in error and "llama-3-8b" in error


@pytest.mark.parametrize(
    "argv", [["memory", "--layers", "4"], ["memory", "--layers", "2,x"], ["cost", "--epochs", "1"]]
)
def test_pairs_other_than_two_whole_numbers_are_refused_in_one_line(
        argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["scale.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        scale.main()
    assert exit_info.value.code == 2
    assert "expected two positive whole numbers" in capsys.readouterr().err.strip().splitlines()[-1]
