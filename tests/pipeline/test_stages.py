"""Stage functions the flow's tasks call, run directly (no Prefect)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mobiquant.calibration import CalibrationConfig
from mobiquant.data import calibration_samples
from mobiquant.sources import load_tokenizer
from tasks import stages
from tests.pipeline.tiny import corpus


def test_capture_draws_its_samples_again_when_the_text_under_the_same_name_changes(
    tiny_model: Path, tmp_path: Path
) -> None:
    text = tmp_path / "calibration.txt"
    config = CalibrationConfig(group_size=32, router_hidden=8).to_dict()
    tokenizer = load_tokenizer(tiny_model)
    for seed in (1, 2):
        text.write_text(corpus(seed=seed))
        captured = stages.capture(
            tiny_model, tmp_path / "capture", calibration_data=str(text), samples=4, seqlen=32, seed=0,
            config=config, device="cpu", source_model={"sha": "0" * 64, "source": "tiny", "kind": "local"},
        )  # fmt: skip
        stored = load_file(captured["samples_path"])["ids"]
        # The thresholds stage fits on this file: it must hold the samples of the text calibrated now.
        assert torch.equal(stored, calibration_samples(tokenizer, str(text), 4, 32, 0)), seed
