"""One block in memory at a time: streamed evaluation, file-based calibration, capture dtypes and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from mobiquant.calibration import CalibrationConfig, quantize_files, quantize_model
from mobiquant.calibration.capture import capture_block_inputs
from mobiquant.calibration.driver import calibrate_blocks
from mobiquant.calibration.store import (
    KWARGS_FILE,
    fp_input_path,
    load_block_kwargs,
    quantized_input_path,
    read_manifest,
    resume_key,
)
from mobiquant.checkpoint import mobi_layers
from mobiquant.evaluation import perplexity, rtn_model, rtn_transform, streamed_perplexities
from mobiquant.model_files import ModelFiles
from mobiquant.sources import SourceError
from mobiquant.streaming import first_block_inputs
from tests.tiny_models import GROUP, VOCAB, tiny_model

CPU = torch.device("cpu")
FAST = {"group_size": GROUP, "router_hidden": 16, "epochs_stage1": 1, "epochs_stage2": 1, "batch_size": 4}


def saved(family: str, folder: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Path]:
    model = tiny_model(family, seed=int(torch.randint(0, 10_000, ()))).to(dtype)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def no_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a whole model from a folder fails the test."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


# Qwen3 and the Gemmas mix sliding-window and full-attention layers: each block is run with its own mask.
@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_streamed_perplexity_matches_the_whole_model(family: str, tmp_path: Path) -> None:
    model, folder = saved(family, tmp_path / "m")
    tokens = torch.randint(0, VOCAB, (1, 333))
    files = ModelFiles(folder)
    got = streamed_perplexities(files, tokens, {"fp": None, "rtn3": rtn_transform(files.arch, 3, GROUP)}, CPU,
                                seqlen=40, max_windows=6, progress=False)
    want = perplexity(model, tokens, seqlen=40, max_windows=6, progress=False)
    want_rtn = perplexity(rtn_model(model, files.arch, 3, GROUP), tokens, seqlen=40, max_windows=6, progress=False)
    assert got["fp"] == pytest.approx(want, rel=1e-6)
    assert got["rtn3"] == pytest.approx(want_rtn, rel=1e-6)
    assert got["rtn3"] != pytest.approx(got["fp"], rel=1e-6), "the variant changed the weights"


@pytest.mark.parametrize(("family", "mode"), [("llama", "parallel"), ("opt", "sequential"), ("qwen2", "sequential")])
def test_file_calibration_matches_in_memory_calibration(
    family: str, mode: str, tmp_path: Path, no_whole_model: None
) -> None:
    model, folder = saved(family, tmp_path / "m")
    samples = torch.randint(0, VOCAB, (6, 24))
    config = CalibrationConfig(**FAST, mode=mode)
    from_files = quantize_files(folder, samples, config, tmp_path / "w1", model_key="k", device=CPU, progress=False)
    in_memory = quantize_model(model, samples, config, tmp_path / "w2", progress=False)
    layers, reference = mobi_layers(from_files), mobi_layers(in_memory)
    assert layers.keys() == reference.keys()
    for name, layer in layers.items():
        for key, tensor in layer.state_dict().items():
            assert torch.equal(tensor, reference[name].state_dict()[key]), f"{name}.{key}"
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        assert torch.equal(from_files(ids).logits, in_memory(ids).logits)


def test_bfloat16_source_keeps_its_dtype(tmp_path: Path, no_whole_model: None) -> None:
    _model, folder = saved("llama", tmp_path / "m", torch.bfloat16)
    samples = torch.randint(0, VOCAB, (4, 16))
    files = ModelFiles(folder)
    assert files.source_dtype == torch.bfloat16
    manifest = capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k")
    assert manifest["dtype"] == "bfloat16"
    assert load_file(str(fp_input_path(tmp_path / "c", 1)))["hidden"].dtype == torch.bfloat16
    wide = capture_block_inputs(files, samples, tmp_path / "c32", device=CPU, model_key="k",
                                store_dtype=torch.float32)
    assert wide["dtype"] == "float32"
    assert load_file(str(fp_input_path(tmp_path / "c32", 1)))["hidden"].dtype == torch.float32
    quantized = quantize_files(folder, samples, CalibrationConfig(**FAST), tmp_path / "w", model_key="k",
                               device=CPU, progress=False)
    state = quantized.state_dict()
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert state["model.norm.weight"].dtype == torch.bfloat16
    assert state["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16


def test_capture_resumes_after_its_last_written_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model, folder = saved("llama", tmp_path / "m")
    samples = torch.randint(0, VOCAB, (4, 16))
    reference = capture_block_inputs(ModelFiles(folder), samples, tmp_path / "ref", device=CPU, model_key="k")
    files = ModelFiles(folder)
    loaded: list[int] = []
    real_block = files.block

    def failing_block(index: int, device: torch.device) -> torch.nn.Module:
        loaded.append(index)
        if index == 0 and loaded.count(0) == 1:
            raise KeyboardInterrupt
        return real_block(index, device)

    monkeypatch.setattr(files, "block", failing_block)
    with pytest.raises(KeyboardInterrupt):
        capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k")
    first = fp_input_path(tmp_path / "c", 0)
    written = first.stat().st_mtime_ns
    manifest = capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k")
    assert first.stat().st_mtime_ns == written, "a written block input is not rewritten"
    assert manifest["num_blocks"] == reference["num_blocks"] == 2
    for index in range(2):
        assert torch.equal(load_file(str(fp_input_path(tmp_path / "c", index)))["hidden"],
                           load_file(str(fp_input_path(tmp_path / "ref", index)))["hidden"])


def test_sequential_resume_recreates_missing_quantized_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model, folder = saved("llama", tmp_path / "m")
    samples = torch.randint(0, VOCAB, (4, 16))
    files = ModelFiles(folder)
    config = CalibrationConfig(**FAST, mode="sequential")
    capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k")
    calibrate_blocks(files, tmp_path / "c", config, tmp_path / "b", CPU, progress=False)
    key = resume_key(read_manifest(tmp_path / "c"), config)
    propagated = quantized_input_path(tmp_path / "c", 1, key)
    before = load_file(str(propagated))["hidden"]
    propagated.unlink()

    import mobiquant.calibration.driver as driver

    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a finished block was calibrated again")

    monkeypatch.setattr(driver, "calibrate_block", never)
    reports = calibrate_blocks(files, tmp_path / "c", config, tmp_path / "b", CPU, progress=False)
    assert [r["cached"] for r in reports] == [True, True]
    assert torch.equal(load_file(str(propagated))["hidden"], before)


def test_results_are_keyed_by_model_samples_and_settings(tmp_path: Path) -> None:
    _model, folder = saved("llama", tmp_path / "m")
    files = ModelFiles(folder)
    samples = torch.randint(0, VOCAB, (4, 16))
    config = CalibrationConfig(**FAST)
    capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k")
    first = calibrate_blocks(files, tmp_path / "c", config, tmp_path / "b", CPU, progress=False)
    again = calibrate_blocks(files, tmp_path / "c", config, tmp_path / "b", CPU, progress=False)
    assert [r["cached"] for r in first] == [False, False] and [r["cached"] for r in again] == [True, True]
    other = CalibrationConfig(**{**FAST, "seed": 1})
    assert not any(r["cached"] for r in calibrate_blocks(files, tmp_path / "c", other, tmp_path / "b", CPU,
                                                         progress=False))
    capture_block_inputs(files, (samples + 1) % VOCAB, tmp_path / "c", device=CPU, model_key="k")
    assert not any(r["cached"] for r in calibrate_blocks(files, tmp_path / "c", other, tmp_path / "b", CPU,
                                                         progress=False))


def test_capture_keeps_each_blocks_arguments_and_older_captures_results_are_recomputed(tmp_path: Path) -> None:
    model, folder = saved("qwen3", tmp_path / "m")
    files = ModelFiles(folder)
    samples = torch.randint(0, VOCAB, (4, 24))
    manifest = capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k")
    stored = load_block_kwargs(tmp_path / "c" / KWARGS_FILE)
    _hidden, recorded = first_block_inputs(model, files.arch, samples)
    # A sliding-window layer, then a full-attention one: two sets of arguments.
    assert stored.set_of_block == recorded.set_of_block == (0, 1)
    for index in range(files.num_blocks):
        torch.testing.assert_close(stored.for_block(index), recorded.for_block(index), rtol=0, atol=0)
    # A capture of the older format held block 0's arguments alone: results computed from it are not reused.
    config = CalibrationConfig(**FAST)
    assert resume_key({**manifest, "format": "inputs+loss-saliency-v1"}, config) != resume_key(manifest, config)



def test_a_capture_of_an_older_format_is_taken_again_and_the_bar_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    _model, folder = saved("llama", tmp_path / "m")
    files = ModelFiles(folder)
    samples = torch.randint(0, VOCAB, (2, 16))
    capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k", progress=False)
    manifest_path = tmp_path / "c" / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "format": "inputs+loss-saliency-v1"}))
    capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k", progress=True)
    assert "capturing block inputs again (the work folder's capture is of an older format)" in capsys.readouterr().err
    assert json.loads(manifest_path.read_text())["format"] != "inputs+loss-saliency-v1"


def _rewrite(folder: Path, change: dict[str, torch.Tensor | None]) -> None:
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    for name, tensor in change.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def test_source_tensors_are_checked_one_by_one(tmp_path: Path) -> None:
    _model, folder = saved("llama", tmp_path / "m")
    ModelFiles(folder).check()
    _rewrite(folder, {"model.layers.1.mlp.up_proj.weight": torch.zeros(128, 32)})
    with pytest.raises(SourceError, match=r"model\.layers\.1\.mlp\.up_proj\.weight in .* has shape \[128, 32\], the "
                                          r"config needs \[128, 64\]"):
        ModelFiles(folder).check()
    _rewrite(folder, {"model.layers.1.mlp.up_proj.weight": None})
    with pytest.raises(SourceError, match=r"lacks the tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        ModelFiles(folder).check()


def test_a_work_folder_in_use_by_another_calibration_is_refused_at_once(tmp_path: Path) -> None:
    import fcntl

    from mobiquant.calibration.driver import LOCK_FILE, WorkFolderInUse

    model, folder = saved("llama", tmp_path / "m")
    samples = torch.randint(0, VOCAB, (4, 16))
    work = tmp_path / "w"
    work.mkdir()
    # Another open file description of the lock file: flock conflicts with it as with another process's.
    with open(work / LOCK_FILE, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for calibrate in (
            lambda: quantize_files(folder, samples, CalibrationConfig(**FAST), work, model_key="k", device=CPU,
                                   progress=False),
            lambda: quantize_model(model, samples, CalibrationConfig(**FAST), work, progress=False),
        ):
            with pytest.raises(WorkFolderInUse, match="in use by another calibration running now"):
                calibrate()
        assert [p.name for p in work.iterdir()] == [LOCK_FILE], "nothing written"
    # Released with its holder: the folder is free again.
    quantize_files(folder, samples, CalibrationConfig(**FAST), work, model_key="k", device=CPU, progress=False)


def test_a_work_folder_is_removed_only_when_free_and_moved_aside_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run starting while a finished one removes the folder must get a folder of its own: not one being emptied,
    and not a lock on a file that is no longer the folder's (both would let two runs hold the folder at once)."""
    import fcntl

    from mobiquant.calibration import driver
    from mobiquant.calibration.driver import LOCK_FILE, WorkFolderInUse, remove_work_folder, work_folder_lock

    work = tmp_path / "w"
    (work / "capture").mkdir(parents=True)
    (work / "capture" / "block_0000.safetensors").write_bytes(b"captured")
    with work_folder_lock(work):
        assert remove_work_folder(work) is False
    assert (work / "capture" / "block_0000.safetensors").read_bytes() == b"captured"

    renamed: list[Path] = []
    real_rmtree = driver.shutil.rmtree

    def rmtree(path: Path, ignore_errors: bool = False) -> None:
        renamed.append(Path(path))
        # Removal is slow on a large capture: a run starting now must not find the folder being emptied.
        assert not work.exists()
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(driver.shutil, "rmtree", rmtree)
    assert remove_work_folder(work) is True
    assert renamed and renamed[0].parent == tmp_path and not any(tmp_path.iterdir())

    # Another process removed and re-created the lock file between this run's open and its flock.
    work.mkdir()
    real_flock = fcntl.flock

    def flock_after_a_swap(handle: object, operation: int) -> None:
        (work / LOCK_FILE).unlink()
        (work / LOCK_FILE).touch()
        real_flock(handle, operation)

    monkeypatch.setattr(driver.fcntl, "flock", flock_after_a_swap)
    with pytest.raises(WorkFolderInUse, match="in use by another calibration"), work_folder_lock(work):
        pass


def test_an_empty_or_truncated_work_file_is_computed_again(tmp_path: Path) -> None:
    _model, folder = saved("llama", tmp_path / "m")
    samples = torch.randint(0, VOCAB, (4, 16))
    config = CalibrationConfig(**FAST)

    def calibrated(work: Path) -> dict[str, torch.Tensor]:
        model = quantize_files(folder, samples, config, work, model_key="k", device=CPU, progress=False)
        return {f"{name}.{key}": t for name, layer in mobi_layers(model).items()
                for key, t in layer.state_dict().items()}

    reference = calibrated(tmp_path / "clean")
    work = tmp_path / "w"
    calibrated(work)
    result, captured = work / "blocks" / "block_0001.safetensors", fp_input_path(work / "capture", 1)
    # What a power loss can leave of files renamed into place without fsync.
    corruptions = {
        "empty block result": lambda: result.write_bytes(b""),
        # The result removed as well: the block is calibrated again from its (truncated) inputs.
        "truncated capture": lambda: (captured.write_bytes(captured.read_bytes()[:100]), result.unlink()),
        "empty capture manifest": lambda: (work / "capture" / "manifest.json").write_bytes(b""),
    }
    for what, corrupt in corruptions.items():
        corrupt()
        again = calibrated(work)
        assert again.keys() == reference.keys(), what
        assert all(torch.equal(again[k], reference[k]) for k in reference), what
