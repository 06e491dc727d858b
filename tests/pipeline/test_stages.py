"""Stage functions the flow's tasks call, run directly (no Prefect)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobiquant import load_checkpoint, set_precision, track_bits
from mobiquant.calibration import CalibrationConfig
from mobiquant.calibration.store import file_metadata
from mobiquant.data import calibration_samples
from mobiquant.sources import load_tokenizer
from registry.hashing import tree_manifest
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


def _calibrated_blocks(tiny_model: Path, tmp_path: Path, config: dict) -> tuple[dict, list[str]]:
    source = {"sha": "0" * 64, "source": "tiny", "kind": "local"}
    captured = stages.capture(
        tiny_model, tmp_path / "capture", calibration_data=str(tiny_model.parent / "train.txt"), samples=4,
        seqlen=32, seed=0, config=config, device="cpu", source_model=source,
    )  # fmt: skip
    blocks = [
        stages.calibrate_block(tiny_model, i, tmp_path / "capture", config, tmp_path / "blocks", 1, ["cpu"])
        for i in range(captured["num_blocks"])
    ]
    return captured, [b["path"] for b in blocks]


def test_the_checkpoint_stage_saves_once_and_keeps_an_intact_checkpoint_of_the_same_inputs(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = CalibrationConfig(group_size=32, router_hidden=8, epochs_stage1=0, epochs_stage2=1).to_dict()
    captured, block_paths = _calibrated_blocks(tiny_model, tmp_path, config)
    out = tmp_path / "run" / "checkpoint"

    def build() -> dict:
        return stages.checkpoint(tiny_model, tmp_path / "capture", block_paths, config,
                                 Path(captured["samples_path"]), out, "cpu")

    first = build()
    assert not first["reused"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["checkpoint", "checkpoint.key"], "no second copy"
    # The thresholds were fitted on the calibration samples: on them a routed budget is spent as asked.
    model = load_checkpoint(out)
    samples = load_file(captured["samples_path"])["ids"]
    for bits in (3.0, 5.0):
        set_precision(model, avg_bits=bits)
        with torch.no_grad(), track_bits(model) as meter:
            model(samples)
        assert meter.avg_bits == pytest.approx(bits, abs=0.05)

    # The same inputs and an intact folder: nothing is rebuilt.
    monkeypatch.setattr("mobiquant.calibration.finished_model", _must_not_run)
    again = build()
    assert again["reused"] and again["files"] == first["files"]

    # A damaged file, or a block result that changed, is rebuilt.
    monkeypatch.undo()
    (out / "config.json").write_text("{}")
    assert not build()["reused"] and tree_manifest(out) == first["files"]
    tensors, metadata = load_file(block_paths[0]), file_metadata(Path(block_paths[0]))
    tensors[next(iter(tensors))].add_(1)
    save_file(tensors, block_paths[0], metadata)
    rebuilt = build()
    assert not rebuilt["reused"] and rebuilt["files"] != first["files"]


def test_the_checkpoint_stage_tunes_end_to_end_from_the_capture_and_keys_the_checkpoint_by_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    options = dict(group_size=32, router_hidden=8, epochs_stage1=0, epochs_stage2=1)
    plain = CalibrationConfig(**options).to_dict()
    captured, block_paths = _calibrated_blocks(tiny_model, tmp_path, plain)
    samples = load_file(captured["samples_path"])["ids"]
    out = tmp_path / "run" / "checkpoint"
    steps: list[tuple[int, int]] = []

    def build(config: dict) -> dict:
        return stages.checkpoint(tiny_model, tmp_path / "capture", block_paths, config,
                                 Path(captured["samples_path"]), out, "cpu",
                                 on_step=lambda done, total, _loss: steps.append((done, total)))

    assert not build(plain)["reused"] and not steps
    untuned = load_checkpoint(out)
    tuned_config = CalibrationConfig(**options, end_to_end_steps=3, end_to_end_lr=1e-2).to_dict()
    built = build(tuned_config)
    assert not built["reused"], "another stage setting, the same blocks: a new checkpoint"
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert built["end_to_end"]["steps"] == 3 and len(built["end_to_end"]["losses"]) == 3
    assert (out.parent / "end-to-end" / "teacher.safetensors").is_file()
    tuned = load_checkpoint(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["end_to_end_steps"] == 3
    layers = [(a, b) for a, b in zip(untuned.modules(), tuned.modules(), strict=True) if hasattr(a, "planes")]
    assert layers and all(torch.equal(a.planes, b.planes) and not torch.equal(a.scale, b.scale) for a, b in layers)
    # The thresholds were fitted on the tuned weights: a routed budget is still spent as asked.
    set_precision(tuned, avg_bits=3.0)
    with torch.no_grad(), track_bits(tuned) as meter:
        tuned(samples)
    assert meter.avg_bits == pytest.approx(3.0, abs=0.05)
    again = build(tuned_config)
    assert again["reused"] and len(steps) == 3 and again["end_to_end"] == built["end_to_end"]


def _must_not_run(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("recomputed what an earlier call with the same inputs had finished")


def test_validation_measures_again_only_when_what_it_measured_changed(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = CalibrationConfig(group_size=32, router_hidden=8, epochs_stage1=0, epochs_stage2=1).to_dict()
    captured, block_paths = _calibrated_blocks(tiny_model, tmp_path, config)
    built = stages.checkpoint(tiny_model, tmp_path / "capture", block_paths, config, Path(captured["samples_path"]),
                              tmp_path / "checkpoint", "cpu")
    text = tmp_path / "eval.txt"
    text.write_text(corpus(seed=5))

    def validate(files: dict[str, str], windows: int = 2) -> dict:
        return stages.validate(
            tiny_model, tmp_path / "checkpoint", evaluation_data=str(text), eval_seqlen=32, eval_max_windows=windows,
            budgets=[3.0], num_slices=4, group_size=32, device="cpu", out_path=tmp_path / "validation.json",
            model_key="0" * 64, checkpoint_files=files,
        )  # fmt: skip

    first = validate(built["files"])
    assert not first["reused"] and first["budgets"][0]["target_bits"] == 3.0
    monkeypatch.setattr("mobiquant.evaluation.perplexity", _must_not_run)
    again = validate(built["files"])
    assert again["reused"] and again["budgets"] == first["budgets"] and again["uniform"] == first["uniform"]
    monkeypatch.undo()
    assert not validate(built["files"], windows=3)["reused"]
    assert not validate({**built["files"], "model.safetensors": "0" * 64}, windows=3)["reused"]
    text.write_text(corpus(seed=6))
    assert not validate(built["files"], windows=3)["reused"]


@pytest.mark.parametrize("available", [False, True])
def test_the_kernel_stage_asks_mobiquant_kernels_whether_cuda_python_is_there(
    available: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One answer per process, shared with the layers: the stage must not look for cuda-python its own way.
    monkeypatch.setattr("mobiquant.kernels.cuda_python_available", lambda: available)
    monkeypatch.setattr("mobiquant.kernels.compile_kernels", lambda archs: [{"arch": a, "ok": True} for a in archs])
    summary = stages.compile_kernels(["sm_80"], tmp_path)
    assert summary["results"] == ([{"arch": "sm_80", "ok": True}] if available else [])
    assert ("none built" in summary["note"]) != available


def test_the_stages_calibrate_a_mixture_of_experts_per_expert_linear(tmp_path: Path) -> None:
    """A tiny Mixtral (released layout: block_sparse_moe.experts.<e>.w1/w2/w3) through capture, block
    calibration, checkpoint and validation: every expert's linears are quantized and the budget is held."""
    from mobiquant.arch import architecture_of
    from mobiquant.checkpoint import mobi_layers
    from tests.pipeline.tiny import build_tiny_llama

    source = build_tiny_llama(tmp_path / "tiny" / "tiny-mixtral", family="mixtral", num_local_experts=4,
                              num_experts_per_tok=2)
    config = CalibrationConfig(group_size=32, router_hidden=8, epochs_stage1=0, epochs_stage2=1).to_dict()
    captured, block_paths = _calibrated_blocks(source, tmp_path, config)
    stages.checkpoint(source, tmp_path / "capture", block_paths, config, Path(captured["samples_path"]),
                      tmp_path / "checkpoint", "cpu")
    model = load_checkpoint(tmp_path / "checkpoint")
    names = {name.split(".", 3)[3] for name in mobi_layers(model)}
    assert names == set(architecture_of(model.config).linears) and "mlp.experts.3.down_proj" in names
    samples = load_file(captured["samples_path"])["ids"]
    for bits in (3.0, 5.0):
        set_precision(model, avg_bits=bits)
        with torch.no_grad(), track_bits(model) as meter:
            model(samples)
        assert meter.avg_bits == pytest.approx(bits, abs=0.05)
    text = tmp_path / "eval.txt"
    text.write_text(corpus(seed=5))
    validation = stages.validate(
        source, tmp_path / "checkpoint", evaluation_data=str(text), eval_seqlen=32, eval_max_windows=2,
        budgets=[3.0], num_slices=4, group_size=32, device="cpu", out_path=tmp_path / "validation.json",
        model_key="0" * 64, checkpoint_files={},
    )  # fmt: skip
    assert validation["budgets"][0]["target_bits"] == 3.0 and validation["rtn"]
