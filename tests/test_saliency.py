"""Loss-weighted Hessians: token saliencies from a backward walk over the blocks, and the Hessians they weigh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mobiquant.arch import architecture_for
from mobiquant.calibration import CalibrationConfig, calibrate_block
from mobiquant.calibration.capture import capture_block_inputs
from mobiquant.calibration.saliency import input_gradient_path, read_token_saliency, saliency_path
from mobiquant.calibration.store import atomic_save, file_metadata
from mobiquant.clip_search import input_hessians
from mobiquant.gptq import nested_codes
from mobiquant.model_files import ModelFiles
from mobiquant.slicing import unpack_codes
from tests.test_method import heavy_tailed_block, linear_inputs
from tests.tiny_models import GROUP, VOCAB, tiny_config, tiny_model

CPU = torch.device("cpu")


def whole_model_saliency(model: torch.nn.Module, samples: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Reference: one backward pass of the whole model per sample, ``sum_j (dL/dz_tj)^2`` at every linear."""
    arch = architecture_for(model.config.model_type)
    model = model.double()
    found: dict[tuple[int, str], list[torch.Tensor]] = {}

    def record(key: tuple[int, str]):
        def hook(_module, _args, output):
            output.register_hook(lambda grad: found.setdefault(key, []).append(grad.pow(2).sum(-1).reshape(-1)))
        return hook

    handles = [linear.register_forward_hook(record((index, name)))
               for index, block in enumerate(arch.block_list(model))
               for name, linear in arch.quantized_linears(block).items()]
    for row in samples:
        embeds = model.get_input_embeddings()(row.unsqueeze(0)).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1], row[1:], reduction="sum")
        torch.autograd.grad(loss, embeds)
    for handle in handles:
        handle.remove()
    return {key: torch.cat(parts) for key, parts in found.items()}


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_saliencies_equal_the_whole_models_loss_gradients(family: str, tmp_path: Path) -> None:
    model = tiny_model(family, seed=int(torch.randint(0, 10_000, ())))
    model.save_pretrained(tmp_path / "m")
    samples = torch.randint(0, VOCAB, (5, 19))
    files = ModelFiles(tmp_path / "m")
    manifest = capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k",
                                    store_dtype=torch.float32, batch_size=2)
    reference = whole_model_saliency(model, samples)
    for index in range(files.num_blocks):
        assert saliency_path(tmp_path / "c", index).name in manifest["files"]
        saved = load_file(str(saliency_path(tmp_path / "c", index)))
        assert saved.keys() == set(files.arch.linears)
        for name, saliency in saved.items():
            want = reference[(index, name)]
            assert saliency.shape == want.shape
            assert torch.allclose(saliency.double(), want, rtol=1e-3, atol=1e-6 * want.max()), (index, name)
        # The last position's output reaches no loss term.
        assert torch.all(saved[files.arch.linears[0]].reshape(5, 19)[:, -1] == 0)
        assert not input_gradient_path(tmp_path / "c", index).exists(), "the walk leaves no gradient behind"


def test_the_walk_resumes_below_the_lowest_written_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "m")
    samples = torch.randint(0, VOCAB, (4, 16))
    reference_dir = tmp_path / "ref"
    capture_block_inputs(ModelFiles(tmp_path / "m"), samples, reference_dir, device=CPU, model_key="k")
    files = ModelFiles(tmp_path / "m")
    loaded: list[int] = []
    real_block = files.block
    forward_loads = files.num_blocks - 1  # the capture's forward pass loads every block but the last

    def failing_block(index: int, device: torch.device) -> torch.nn.Module:
        loaded.append(index)
        if len(loaded) == forward_loads + 3:  # the walk's third block: blocks 3 and 2 are done
            raise KeyboardInterrupt
        return real_block(index, device)

    monkeypatch.setattr(files, "block", failing_block)
    with pytest.raises(KeyboardInterrupt):
        capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k")
    assert [saliency_path(tmp_path / "c", i).exists() for i in range(4)] == [False, False, True, True]
    assert input_gradient_path(tmp_path / "c", 2).exists()
    written = saliency_path(tmp_path / "c", 3).stat().st_mtime_ns
    loaded.clear()
    capture_block_inputs(files, samples, tmp_path / "c", device=CPU, model_key="k")
    assert loaded == [1, 0], "only the blocks below the last written one run again"
    assert saliency_path(tmp_path / "c", 3).stat().st_mtime_ns == written
    for index in range(4):
        got, want = (load_file(str(saliency_path(folder, index))) for folder in (tmp_path / "c", reference_dir))
        for name in want:
            assert torch.equal(got[name], want[name]), (index, name)


def test_token_weights_have_mean_one_and_keep_uniform_weights_for_a_silent_linear(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=5)
    model.save_pretrained(tmp_path / "m")
    capture_block_inputs(ModelFiles(tmp_path / "m"), torch.randint(0, VOCAB, (3, 12)), tmp_path / "c", device=CPU,
                         model_key="k")
    raw = load_file(str(saliency_path(tmp_path / "c", 1)))
    weights, positions = read_token_saliency(tmp_path / "c", 1)
    assert positions == {}  # a dense block
    for name, saliency in raw.items():
        assert weights[name].dtype == torch.float64
        assert weights[name].mean().item() == pytest.approx(1.0, rel=1e-12)
        assert torch.allclose(weights[name] * saliency.double().mean(), saliency.double(), rtol=1e-12)
    path = saliency_path(tmp_path / "c", 1)
    atomic_save({**raw, "mlp.down_proj": torch.zeros_like(raw["mlp.down_proj"])}, path, file_metadata(path))
    silent = read_token_saliency(tmp_path / "c", 1).weights["mlp.down_proj"]
    assert torch.equal(silent, torch.ones(36, dtype=torch.float64))


def test_weighted_hessians_are_x_transposed_diag_w_x() -> None:
    linear = torch.nn.Linear(12, 5)
    batches = [torch.randn(3, 7, 12) for _ in range(3)]
    weights = torch.rand(63, dtype=torch.float64) * 3
    sums, _ = input_hessians({"fc": linear}, lambda: [linear(b) for b in batches][-1], {"fc": weights})
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    want = torch.einsum("ti,t,tj->ij", x, weights, x)
    assert torch.allclose(sums["fc"], want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="fewer input rows"):
        input_hessians({"fc": linear}, lambda: linear(batches[0]), {"fc": weights})
    with pytest.raises(ValueError, match="more input rows"):
        input_hessians({"fc": linear}, lambda: [linear(b) for b in batches * 2][-1], {"fc": weights})


def test_calibrated_block_chooses_its_codes_on_the_weighted_hessian() -> None:
    arch, block, inputs, block_kwargs, _targets = heavy_tailed_block(
        lambda shape: torch.distributions.StudentT(3.0).sample(shape) * 0.02)
    config = CalibrationConfig(group_size=GROUP, router_hidden=0, epochs_stage1=0, epochs_stage2=0, batch_size=4)
    seen = linear_inputs(arch, block, inputs, block_kwargs)
    linears = arch.quantized_linears(block)
    # Heavy-tailed weights, as the loss gives them: a few tokens decide.
    tokens = inputs.shape[0] * inputs.shape[1]
    weights = {name: torch.distributions.Exponential(1.0).sample((tokens,)).double() ** 3 for name in linears}
    weighted = calibrate_block(block, inputs, block_kwargs, arch, config, progress=False, token_weights=weights)
    plain = calibrate_block(block, inputs, block_kwargs, arch, config, progress=False)
    differs = 0
    for name, linear in linears.items():
        x = seen[name].double()
        hessian = torch.einsum("ti,t,tj->ij", x, weights[name], x)
        scale, zero = weighted.state[f"{name}.scale"], weighted.state[f"{name}.zero"]
        objective = {2 * slices: weight for slices, weight in config.compensation_objective(name).items()}
        expected, _ = nested_codes(linear.weight.detach(), hessian, scale.float(), zero.float(), 8, objective,
                                   damp=config.damp)
        assert torch.equal(unpack_codes(weighted.state[f"{name}.planes"], 4), expected), name
        differs += not torch.equal(weighted.state[f"{name}.planes"], plain.state[f"{name}.planes"])
    assert differs == len(linears), "the weights decide codes here: the check has teeth"
