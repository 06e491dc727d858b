"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE): linearised experts, calibration, budgets, loading."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from mobiquant import cli
from mobiquant.arch import LinearExperts, architecture_of, fold_experts, summarize_linears
from mobiquant.calibration import CalibrationConfig, calibrate_block, quantize_files
from mobiquant.calibration import block as block_module
from mobiquant.calibration.capture import capture_block_inputs
from mobiquant.calibration.saliency import read_token_saliency, saliency_path
from mobiquant.calibration.store import (
    KWARGS_FILE,
    atomic_save,
    file_metadata,
    fp_input_path,
    load_block_kwargs,
    load_hidden,
    read_result_report,
)
from mobiquant.checkpoint import load_checkpoint, mobi_layers, save_checkpoint
from mobiquant.clip_search import input_hessians
from mobiquant.model_files import ModelFiles
from mobiquant.precision import calibrate_thresholds, hold_budget, set_precision, track_bits
from tests.tiny_models import EXPERTS, MOE_FAMILIES, SLICES, VOCAB, logits, quantize_tiny, tiny_model

FAST = dict(group_size=32, router_hidden=16, epochs_stage1=1, epochs_stage2=1, batch_size=4)


def random_routing(tokens: int, top_k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` distinct experts per token, in random order, with random positive weights."""
    index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:top_k] for _ in range(tokens)])
    return index, torch.rand(tokens, top_k, generator=generator)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_linear_experts_give_the_stacked_modules_outputs(family: str, implementation: str) -> None:
    model = tiny_model(family, seed=5)
    model.set_experts_implementation(implementation)
    arch = architecture_of(model.config)
    fused = copy.deepcopy(arch.block_list(model)[0].get_submodule("mlp.experts"))
    arch.linearize(model)
    linear = arch.block_list(model)[0].get_submodule("mlp.experts")
    assert isinstance(linear, LinearExperts) and len(linear) == EXPERTS
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, model.config.hidden_size, generator=generator)
    for top_k in (1, 2, 3):
        index, weights = random_routing(len(hidden), top_k, generator)
        with torch.no_grad():
            torch.testing.assert_close(linear(hidden, index, weights), fused(hidden, index, weights),
                                       rtol=0, atol=1e-6)
    # Experts no token is routed to are skipped, as in the stacked module.
    index, weights = torch.zeros(len(hidden), 1, dtype=torch.long), torch.ones(len(hidden), 1)
    with torch.no_grad():
        torch.testing.assert_close(linear(hidden, index, weights), fused(hidden, index, weights), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_linearised_model_gives_the_models_logits(family: str) -> None:
    model = tiny_model(family, seed=6)
    converted = architecture_of(model.config).linearize(copy.deepcopy(model))
    ids = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(logits(converted, ids), logits(model, ids), rtol=0, atol=1e-5)
    names = {name for name, _ in converted.named_parameters()}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert not any(name.endswith("gate_up_proj") for name in names)
    # Linearising twice changes nothing.
    assert architecture_of(model.config).linearize(converted) is converted


def test_expert_linears_are_listed_per_expert_and_summarised() -> None:
    arch = architecture_of(tiny_model("mixtral").config)
    assert len(arch.linears) == 4 + 3 * EXPERTS
    assert arch.linears[4:7] == ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj")
    assert summarize_linears(arch.linears) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.experts.<0-3>.gate_proj/up_proj/down_proj"]
    assert summarize_linears(["mlp.experts.1.down_proj", "mlp.experts.2.down_proj", "mlp.experts.5.down_proj"]) == [
        "mlp.experts.<1-2,5>.down_proj"]
    # Per-linear weights keyed by a projection's name reach every expert's.
    CalibrationConfig(module_precision_weights={"down_proj": (1, 1, 1, 1)}).check_linear_names(arch)
    with pytest.raises(ValueError, match=r"mlp\.experts\.<0-3>\.gate_proj/up_proj/down_proj\)$"):
        CalibrationConfig(module_precision_weights={"w2": (1, 1, 1, 1)}).check_linear_names(arch)


def test_fold_experts_names_each_projection_of_every_expert() -> None:
    names = ["self_attn.o_proj", "mlp.experts.0.down_proj", "mlp.experts.7.down_proj", "mlp.experts.3.gate_proj"]
    assert fold_experts(names) == {
        "self_attn.o_proj": "self_attn.o_proj",
        "mlp.experts.0.down_proj": "mlp.experts.<0-7>.down_proj",
        "mlp.experts.7.down_proj": "mlp.experts.<0-7>.down_proj",
        "mlp.experts.3.gate_proj": "mlp.experts.<0-7>.gate_proj",
    }
    # A model of one expert has no range: <0>, not <0-0>.
    assert fold_experts(["mlp.experts.0.up_proj", "self_attn.q_proj"]) == {
        "mlp.experts.0.up_proj": "mlp.experts.<0>.up_proj", "self_attn.q_proj": "self_attn.q_proj"}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_set_precision_holds_the_budget_when_experts_serve_different_token_counts(family: str) -> None:
    """An expert's linears serve only their tokens: the budget is in bits of the weights the tokens ran, as
    track_bits counts them, and is met on the calibration data as on a dense model (tests/test_method.py)."""
    model = quantize_tiny(tiny_model(family, seed=7), seed=7)
    samples = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    calibrate_thresholds(model, samples)
    served = {name: 0 for name in mobi_layers(model)}
    hooks = [layer.register_forward_pre_hook(lambda _m, a, n=name: served.__setitem__(n, served[n] + len(
        a[0].reshape(-1, a[0].shape[-1])))) for name, layer in mobi_layers(model).items()]
    set_precision(model, slices=SLICES)
    with torch.no_grad():
        model(samples)
    for hook in hooks:
        hook.remove()
    experts = [count for name, count in served.items() if ".experts." in name]
    assert len(set(experts)) > 1 and max(experts) < samples.numel()
    for bits in (2.5, 3.0, 4.0, 5.5, 7.0):
        set_precision(model, avg_bits=bits)
        with track_bits(model) as meter, torch.no_grad():
            model(samples)
        assert meter.avg_bits == pytest.approx(bits, abs=0.05)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_held_budget_moves_by_the_tokens_of_a_pass_whatever_its_experts_serve(family: str) -> None:
    """hold_budget moves the budget by (avg_bits - spent) * tokens / horizon_tokens after each pass: the tokens are
    the pass's, though each expert's linears serve only the tokens routed to it."""
    model = quantize_tiny(tiny_model(family, seed=3), seed=3)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with hold_budget(model, 3.0, horizon_tokens=4 * ids.numel()) as hold, torch.no_grad():
        for _pass in range(2):
            before = hold.budget
            with track_bits(model) as meter:
                model(ids)
            assert hold.budget == pytest.approx(before + (3.0 - meter.avg_bits) / 4, rel=1e-12)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quantize_save_load_generate_info(family: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A source folder in the released layout (per-expert tensors; Mixtral's block_sparse_moe.experts.<e>.w1)
    calibrated block by block, saved, loaded by load_checkpoint and by from_pretrained, generating; at 4 slices
    its logits are close to the float model's; mobiquant info summarises the experts."""
    model = tiny_model(family, seed=4)
    model.save_pretrained(tmp_path / "source")
    samples = torch.randint(0, VOCAB, (4, 32))
    quantized = quantize_files(tmp_path / "source", samples, CalibrationConfig(**FAST), tmp_path / "work",
                               model_key="k", device=torch.device("cpu"), progress=False)
    save_checkpoint(quantized, tmp_path / "checkpoint")
    arch = architecture_of(model.config)
    per_block = len(arch.linears)
    with safe_open(str(tmp_path / "checkpoint" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.experts.3.down_proj.planes" in keys and "model.layers.0.mlp.gate.weight" in keys
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert config["quantization_config"]["linears"] == list(arch.linears)
    ids = torch.randint(0, VOCAB, (2, 32))
    reference = logits(model, ids)
    for loaded in (load_checkpoint(tmp_path / "checkpoint"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")):
        assert len(mobi_layers(loaded)) == per_block * model.config.num_hidden_layers
        errors = {}
        for k in (1, SLICES):
            set_precision(loaded, slices=k)
            errors[k] = float((logits(loaded, ids) - reference).pow(2).mean())
        assert errors[SLICES] < 0.05 * float(reference.var()) and errors[SLICES] < errors[1] / 20, errors
        set_precision(loaded, avg_bits=4.0)
        with torch.no_grad():
            generated = loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, 12)
    # save_pretrained, of the model just calibrated or of a loaded one, keeps the model's names (transformers
    # would give Mixtral's its released names, block_sparse_moe).
    for saved, folder in ((quantized, "direct"), (loaded, "again")):
        saved.save_pretrained(tmp_path / folder)
        with safe_open(str(tmp_path / folder / "model.safetensors"), "pt") as handle:
            assert set(handle.keys()) == keys, folder
        load_checkpoint(tmp_path / folder)
    assert cli.main(["info", str(tmp_path / "checkpoint"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quantized_layers"] == per_block * model.config.num_hidden_layers
    assert summary["layers"]["mlp.experts.<0-3>.down_proj"]["count"] == EXPERTS * model.config.num_hidden_layers
    assert cli.main(["info", str(tmp_path / "checkpoint")]) == 0
    out = capsys.readouterr().out
    assert "mlp.experts.<0-3>.gate_proj" in out and "mlp.experts.1." not in out


def test_experts_stored_stacked_are_read_per_expert(tmp_path: Path) -> None:
    """A source whose files hold the stacked layout (as transformers holds it in memory) reads the same."""
    from safetensors.torch import save_file

    from mobiquant.model_files import ModelFiles

    model = tiny_model("qwen3_moe", seed=8)
    model.save_pretrained(tmp_path / "released")
    (tmp_path / "stacked").mkdir()
    (tmp_path / "stacked" / "config.json").write_text((tmp_path / "released" / "config.json").read_text())
    save_file({name: t.contiguous() for name, t in model.state_dict().items()},
              str(tmp_path / "stacked" / "model.safetensors"), metadata={"format": "pt"})
    released, stacked = ModelFiles(tmp_path / "released"), ModelFiles(tmp_path / "stacked")
    stacked.check()
    for index in range(model.config.num_hidden_layers):
        want = released.block(index, torch.device("cpu")).state_dict()
        got = stacked.block(index, torch.device("cpu")).state_dict()
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name], got[name]), name


def test_stacked_experts_fewer_than_the_config_names_are_one_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mobiquant.model_files import ModelFiles
    from mobiquant.sources import SourceError

    model = tiny_model("qwen3_moe", seed=8)
    model.config.save_pretrained(tmp_path)
    state = {name: t[: EXPERTS - 1] if ".experts." in name else t for name, t in model.state_dict().items()}
    save_file({name: t.contiguous() for name, t in state.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(SourceError, match=rf"experts\.gate_up_proj in .* has the shape \[{EXPERTS - 1}, 128, 64\]: "
                                          rf"the config's {EXPERTS} experts need {EXPERTS} stacked matrices$"):
        ModelFiles(tmp_path).check()


def test_stacked_experts_of_integers_are_named_not_floating_point(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mobiquant.model_files import ModelFiles
    from mobiquant.sources import SourceError

    model = tiny_model("qwen3_moe", seed=8)
    model.config.save_pretrained(tmp_path)
    state = {name: t.to(torch.int32) if name.endswith(".experts.down_proj") else t
             for name, t in model.state_dict().items()}
    save_file({name: t.contiguous() for name, t in state.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(SourceError, match=r"experts\.down_proj in .* is torch\.int32, not floating point$"):
        ModelFiles(tmp_path).check()


def test_a_bad_tensor_in_released_names_is_named_as_stored(tmp_path: Path) -> None:
    """Mixtral's files name an expert's linears w1/w2/w3 under block_sparse_moe: a bad one is named so, not by the
    name transformers gives it in memory, which no file holds."""
    from safetensors.torch import load_file, save_file

    from mobiquant.model_files import ModelFiles
    from mobiquant.sources import SourceError
    from tests.pipeline.tiny import build_tiny_llama

    source = build_tiny_llama(tmp_path / "mixtral", family="mixtral", num_local_experts=EXPERTS, num_experts_per_tok=2)
    (weights,) = source.glob("*.safetensors")
    stored = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    state = load_file(weights)
    state[stored][0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(SourceError, match=rf"^{re.escape(stored)} contains NaN or Inf values"):
        ModelFiles(source).check()
    state[stored] = state[stored][:, :-1].contiguous()
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(SourceError, match=rf"^tensor {re.escape(stored)} in .* has shape"):
        ModelFiles(source).check()


def _never_the_last_expert(self: MixtralTopKRouter, hidden_states: torch.Tensor) -> tuple:
    """Mixtral's router with the last expert never chosen (as a real router may never choose an expert on a
    small calibration set)."""
    router_logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    router_logits[:, -1] = float("-inf")
    probs = torch.softmax(router_logits.float(), dim=-1)
    top, indices = torch.topk(probs, self.top_k, dim=-1)
    return router_logits, top / top.sum(dim=-1, keepdim=True), indices


def test_an_expert_no_calibration_token_reaches_is_calibrated_from_its_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No token routed to an expert: its Hessian is zero. The calibration finishes with finite tensors (the
    identity Hessian: codes and clipping from the weight error), says so once per block, and the thresholds run
    the expert at whole slice counts."""
    model = tiny_model("mixtral", seed=9)
    model.save_pretrained(tmp_path / "source")
    monkeypatch.setattr(MixtralTopKRouter, "forward", _never_the_last_expert)
    samples = torch.randint(0, VOCAB, (4, 32))
    with caplog.at_level(logging.WARNING):
        quantized = quantize_files(tmp_path / "source", samples, CalibrationConfig(**FAST), tmp_path / "work",
                                   model_key="k", device=torch.device("cpu"), progress=False)
    unreached = [r.getMessage() for r in caplog.records if "no calibration token reached" in r.getMessage()]
    assert len(unreached) == model.config.num_hidden_layers
    assert "reached mlp.experts.<3>.gate_proj/up_proj/down_proj;" in unreached[0]
    assert any("saw no calibration token" in r.getMessage() for r in caplog.records)
    layers = mobi_layers(quantized)
    for name, layer in layers.items():
        for tensor_name, tensor in layer.state_dict().items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{name}.{tensor_name}"
    arch = architecture_of(model.config)
    fp = arch.linearize(copy.deepcopy(model))
    for index in range(model.config.num_hidden_layers):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{index}.mlp.experts.{EXPERTS - 1}.{projection}"
            weight = fp.get_submodule(name).weight
            error = (layers[name].sliced_weight().dequantize(SLICES).float() - weight).pow(2).mean()
            # 8 bits of codes from the weight error alone: close to the weight.
            assert error < 1e-4 * weight.pow(2).mean(), name
            # Row gains fitted to the weight error (a zero Hessian would leave them all at 1).
            assert not torch.all(layers[name].gains[0] == 1), name
            # Its thresholds are whole numbers: no router call, the slice count nearest the budget.
            assert torch.equal(layers[name].thresholds, layers[name].thresholds.round()), name
            for bits, slices in ((2.5, 1), (3.0, 2), (4.0, 2), (5.0, 3), (6.0, 3), (7.0, 4)):
                set_precision(quantized, avg_bits=bits)
                assert float(layers[name].threshold) == SLICES - slices, (name, bits)
            # Its router is constant: between grid points (a fractional threshold) every token runs alike.
            with torch.no_grad():
                scores = layers[name].router(torch.randn(16, layers[name].in_features))
            assert torch.equal(scores, torch.zeros_like(scores)), name
    # The router as released reaches that expert again: the model runs, finite, at every budget.
    monkeypatch.undo()
    ids = torch.randint(0, VOCAB, (2, 16))
    for bits in (2.0, 3.0, 5.0, 8.0):
        set_precision(quantized, avg_bits=bits)
        assert torch.isfinite(logits(quantized, ids)).all()


def test_an_unreached_expert_is_recorded_without_the_clip_search_and_the_codes_hessians(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the clip search and error compensation no Hessian shows an expert unreached: the block results still
    name it (the flow's log and report read them)."""
    tiny_model("mixtral", seed=9).save_pretrained(tmp_path / "source")
    monkeypatch.setattr(MixtralTopKRouter, "forward", _never_the_last_expert)
    config = CalibrationConfig(**FAST, clip_search=False, error_compensation=False)
    quantize_files(tmp_path / "source", torch.randint(0, VOCAB, (4, 32)), config, tmp_path / "work",
                   model_key="k", device=torch.device("cpu"), progress=False)
    results = sorted(path for path in (tmp_path / "work").rglob("block_*.safetensors") if path.parent.name == "blocks")
    assert len(results) == 2
    for path in results:
        assert read_result_report(path)["unreached"] == [
            f"mlp.experts.{EXPERTS - 1}.{projection}" for projection in ("gate_proj", "up_proj", "down_proj")]


def test_an_expert_reached_at_some_budgets_only_runs_the_others_at_whole_slices(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expert's tokens follow the routing of the blocks before it, which run at each threshold pass's budget:
    it may be reached in some passes and not in others. At the budgets of a pass that reached it not, it runs the
    slice count nearest the budget, not one slice (a near-top budget left at 2 bits for that expert)."""
    passes = [0]

    def every_other_pass_not_the_last_expert(self: MixtralTopKRouter, hidden_states: torch.Tensor) -> tuple:
        if passes[0] % 2:
            return original(self, hidden_states)
        return _never_the_last_expert(self, hidden_states)

    original = MixtralTopKRouter.forward
    monkeypatch.setattr(MixtralTopKRouter, "forward", every_other_pass_not_the_last_expert)
    model = quantize_tiny(tiny_model("mixtral", seed=7), seed=7)
    model.base_model.register_forward_pre_hook(lambda *_args: passes.__setitem__(0, passes[0] + 1))
    samples = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    # Every layer at the budget itself: at 3 bits and above none runs all its tokens at one slice.
    calibrate_thresholds(model, samples, allocate=False)
    for name, layer in mobi_layers(model).items():
        grid, table = layer.threshold_bits.tolist(), layer.thresholds.tolist()
        for bits, threshold in zip(grid[1:-1], table[1:-1], strict=True):
            if threshold.is_integer():
                assert threshold == SLICES - min(max(math.floor(bits / 2 + 0.5), 1), SLICES), (name, bits)
            if bits >= 3.0:
                assert threshold < SLICES - 1, (name, bits)
    # The last expert was reached in some passes (thresholds from its scores) and not in others.
    table = mobi_layers(model)[f"model.layers.0.mlp.experts.{EXPERTS - 1}.down_proj"].thresholds[1:-1].tolist()
    assert any(not t.is_integer() for t in table) and any(t.is_integer() for t in table)


def test_an_expert_not_reached_at_full_precision_runs_the_budget_where_it_is_reached(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The allocation's pass runs the model at full precision; the threshold passes, at lower budgets, route
    otherwise and may reach an expert that pass did not. That expert weighs nothing in the allocation (its share
    would be one slice at every budget): it runs the budget itself, and the model spends about the budget."""

    def not_the_last_expert_in_the_allocation_pass(self: MixtralTopKRouter, hidden_states: torch.Tensor) -> tuple:
        # The allocation's pass is the one pass with gradients.
        if torch.is_grad_enabled():
            return _never_the_last_expert(self, hidden_states)
        return original(self, hidden_states)

    original = MixtralTopKRouter.forward
    monkeypatch.setattr(MixtralTopKRouter, "forward", not_the_last_expert_in_the_allocation_pass)
    model = quantize_tiny(tiny_model("mixtral", seed=7), seed=7)
    samples = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    calibrate_thresholds(model, samples)
    layers = mobi_layers(model)
    for index in range(model.config.num_hidden_layers):
        layer = layers[f"model.layers.{index}.mlp.experts.{EXPERTS - 1}.down_proj"]
        for bits, threshold in zip(layer.threshold_bits.tolist(), layer.thresholds.tolist(), strict=True):
            if bits >= 3.0:
                assert threshold < SLICES - 1, (index, bits)
    for bits in (5.0, 7.0):
        set_precision(model, avg_bits=bits)
        with track_bits(model) as meter, torch.no_grad():
            model(samples)
        assert meter.avg_bits == pytest.approx(bits, abs=0.2)


def test_input_hessians_give_a_zero_sum_to_an_optional_module_that_sees_nothing() -> None:
    seen, unseen = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    sums, _ = input_hessians({"seen": seen, "unseen": unseen}, lambda: seen(torch.randn(3, 8)), optional=["unseen"])
    assert torch.equal(sums["unseen"], torch.zeros(8, 8, dtype=torch.float64)) and sums["seen"].any()
    with pytest.raises(RuntimeError, match="no calibration input reached"):
        input_hessians({"seen": seen, "unseen": unseen}, lambda: seen(torch.randn(3, 8)))


def test_an_in_memory_mixture_of_experts_is_quantized_in_place(tmp_path: Path) -> None:
    """quantize_model (the in-memory path) linearises the caller's model, then quantizes every expert linear."""
    from mobiquant.calibration import quantize_model

    model = tiny_model("qwen3_moe", seed=10)
    samples = torch.randint(0, VOCAB, (4, 32))
    ids = torch.randint(0, VOCAB, (2, 32))
    reference = logits(model, ids)
    quantized = quantize_model(model, samples, CalibrationConfig(**FAST), tmp_path / "work", progress=False)
    arch = architecture_of(model.config)
    assert len(mobi_layers(quantized)) == len(arch.linears) * model.config.num_hidden_layers
    set_precision(quantized, slices=SLICES)
    error = float((logits(quantized, ids) - reference).pow(2).mean())
    assert error < 0.05 * float(reference.var())


def test_an_expert_routed_otherwise_than_its_saliencies_weighs_its_tokens_alike(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Saliencies are measured on the full-precision routing; an expert whose tokens changed (sequential mode's
    quantized inputs, a near tie) gets the unweighted X^T X instead of failing."""
    expert, dense = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    weights = {"expert": torch.rand(7, dtype=torch.float64), "dense": torch.rand(5, dtype=torch.float64)}
    with caplog.at_level(logging.WARNING):
        sums, _ = input_hessians({"expert": expert, "dense": dense}, lambda: (expert(x), dense(x)), weights,
                                 optional=["expert"])
    torch.testing.assert_close(sums["expert"], x.double().T @ x.double())
    torch.testing.assert_close(sums["dense"], (x.double() * weights["dense"][:, None]).T @ x.double())
    assert "routing changed" in caplog.text
    with pytest.raises(ValueError, match="saw more input rows"):
        input_hessians({"dense": dense}, lambda: dense(torch.randn(9, 8)), {"dense": weights["dense"]})


def test_sequential_mode_calibrates_a_mixture_of_experts(tmp_path: Path) -> None:
    """Sequential mode routes the quantized blocks' outputs: the experts' rows are not the saliencies' tokens."""
    model = tiny_model("mixtral", seed=11)
    model.save_pretrained(tmp_path / "source")
    quantized = quantize_files(tmp_path / "source", torch.randint(0, VOCAB, (4, 32)),
                               CalibrationConfig(**FAST, mode="sequential"), tmp_path / "work", model_key="k",
                               device=torch.device("cpu"), progress=False)
    ids = torch.randint(0, VOCAB, (2, 32))
    reference = logits(model, ids)
    set_precision(quantized, slices=SLICES)
    assert float((logits(quantized, ids) - reference).pow(2).mean()) < 0.05 * float(reference.var())


def test_padding_counts_in_no_experts_measured_bits() -> None:
    """An expert's linears serve some of a padded batch's rows: the mask is laid over those rows, so the bits of a
    padded batch are those of its prompts run alone (tests/test_model_use.py for the dense families)."""
    from tests.test_model_use import bits_of_a_padded_batch, bits_of_each_prompt_alone, padded_prompts
    from tests.tiny_models import set_uniform

    model = quantize_tiny(tiny_model("mixtral", seed=12), seed=12)
    set_uniform(model, None, threshold=1.5)
    prompts, next_tokens, batch, mask = padded_prompts()
    assert bits_of_a_padded_batch(model, batch, mask, next_tokens) == pytest.approx(
        bits_of_each_prompt_alone(model, prompts, next_tokens), rel=1e-9)


def test_the_commands_quantize_and_evaluate_a_mixture_of_experts(tmp_path: Path, capsys: pytest.CaptureFixture
                                                                   ) -> None:
    from tests.pipeline.tiny import build_tiny_llama

    source = build_tiny_llama(tmp_path / "tiny" / "mixtral", family="mixtral", num_local_experts=EXPERTS,
                              num_experts_per_tok=2)
    text = str(source.parent / "train.txt")
    out = tmp_path / "mixtral-mobiquant"
    assert cli.main(["quantize", str(source), "-o", str(out), "--samples", "4", "--seqlen", "32", "--epochs", "1,1",
                     "--data", text, "--seed", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--data", text, "--avg-bits", "3", "--uniform", "1,4", "--seqlen", "32",
                     "--max-windows", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(row["perplexity"])) for row in rows)
    assert sorted(row["avg_bits"] for row in rows)[::2] == [2.0, 8.0]


def captured_mixtral(tmp_path: Path) -> tuple[ModelFiles, Path]:
    """A tiny Mixtral's capture: block inputs and saliencies, the saliency pass in batches of 3 samples."""
    model = tiny_model("mixtral", seed=13)
    model.save_pretrained(tmp_path / "m")
    files = ModelFiles(tmp_path / "m")
    samples = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(13))
    capture_block_inputs(files, samples, tmp_path / "c", device=torch.device("cpu"), model_key="k",
                         store_dtype=torch.float32, batch_size=3)
    return files, tmp_path / "c"


def hessians_with_a_flip(files: ModelFiles, capture_dir: Path, monkeypatch: pytest.MonkeyPatch, recorded: dict,
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Block 0's Hessians from calibrate_block (batches of 2 samples) with one token swapped for another at expert
    ``e`` (the row count of ``e`` stays): token ``a``, ``e``'s first, goes to ``f`` instead; token ``b``, after ``e``'s
    second token and not routed to it, goes to ``e`` instead of ``g``. Also the experts' inputs and routing as the
    Hessian pass fed them (all tokens, in order), and ``(e, a, b, f, g)``."""
    e = next(k for k in range(EXPERTS) if len(recorded[f"mlp.experts.{k}.gate_proj:token_positions"]) >= 3)
    measured = recorded[f"mlp.experts.{e}.gate_proj:token_positions"].tolist()
    a = measured[0]
    b = next(t for t in range(measured[1] + 1, 10**6) if t not in measured)
    block = files.block(0, torch.device("cpu"))
    fed: list[tuple[torch.Tensor, torch.Tensor]] = []
    swap: dict[str, int] = {}

    def flip(_module: torch.nn.Module, args: tuple) -> tuple:
        hidden, index, weights = args
        start = sum(len(h) for h, _ in fed)
        index = index.clone()
        if start <= a < start + len(hidden):
            row = index[a - start]
            swap["f"] = next(k for k in range(EXPERTS) if k not in row.tolist())
            row[row == e] = swap["f"]
        if start <= b < start + len(hidden):
            swap["g"] = int(index[b - start, 0])
            index[b - start, 0] = e
        fed.append((hidden.detach().clone(), index))
        return hidden, index, weights

    block.get_submodule("mlp.experts").register_forward_pre_hook(flip)
    sums: dict[str, torch.Tensor] = {}
    real = block_module.input_hessians

    def keep(*args: object, **kwargs: object) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        found, outputs = real(*args, **kwargs)
        sums.update(found)
        return found, outputs

    monkeypatch.setattr(block_module, "input_hessians", keep)
    kwargs = load_block_kwargs(capture_dir / KWARGS_FILE).for_block(0)
    config = CalibrationConfig(group_size=32, router_hidden=0, epochs_stage1=0, epochs_stage2=0, batch_size=2,
                               error_compensation=False)
    saliency = read_token_saliency(capture_dir, 0)
    calibrate_block(block, load_hidden(fp_input_path(capture_dir, 0)), kwargs, files.arch, config, progress=False,
                    token_weights=saliency.weights, token_positions=saliency.positions)
    hidden = torch.cat([h for h, _ in fed]).double()
    routing = torch.cat([index for _, index in fed])
    return sums, hidden, routing, (e, a, b, swap["f"], swap["g"])


def weighted_gram(x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``X^T diag(w) X``, row by row in float64: the reference, sharing no code with input_hessians."""
    out = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for row, weight in zip(x, weights, strict=True):
        out += weight * torch.outer(row, row)
    return out


def test_an_expert_whose_router_swaps_a_token_weighs_each_row_by_its_own_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A near tie can route one token away from an expert and another to it between the saliency pass and the
    Hessian pass, leaving the expert's row count alone: the rows after the swap must keep their own tokens'
    saliencies (matched by token position, over batches of other sizes), not their neighbours', and the token new to
    the expert weighs 1, the mean."""
    files, capture_dir = captured_mixtral(tmp_path)
    recorded = load_file(str(saliency_path(capture_dir, 0)))
    with caplog.at_level(logging.WARNING, logger="mobiquant.clip_search"):
        sums, hidden, routing, (e, a, b, f, g) = hessians_with_a_flip(files, capture_dir, monkeypatch, recorded)
    # The gate and up projections of an expert take the expert's inputs, each with saliencies of its own.
    for k in range(EXPERTS):
        tokens = torch.nonzero((routing == k).any(dim=1)).flatten().tolist()
        for projection in ("gate_proj", "up_proj"):
            name = f"mlp.experts.{k}.{projection}"
            measured = recorded[f"{name}:token_positions"].tolist()
            saliency = recorded[name].double()
            own = dict(zip(measured, (saliency / saliency.mean()).tolist(), strict=True))
            want = weighted_gram(hidden[tokens], [own.get(t, 1.0) for t in tokens])
            torch.testing.assert_close(sums[name], want, rtol=1e-10, atol=1e-12)
            if k == e:
                assert len(tokens) == len(measured) and tokens != measured and a not in tokens and b in tokens
                # What row order gave: every row between the swapped tokens took the saliency of the token before.
                shifted = weighted_gram(hidden[tokens], (saliency / saliency.mean()).tolist())
                assert not torch.allclose(shifted, want, rtol=1e-3), "the swap must change the Hessian"
    affected = 3 * len({e, f, g})
    assert f"{affected} expert linears saw other tokens" in caplog.text
    assert "their 6 rows of tokens measured at other experts weigh 1" in caplog.text


def test_saliencies_stored_without_token_positions_are_matched_by_row_count_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A capture written before the positions were recorded: its expert linears' rows are checked by count only, an
    expert with another count weighs its tokens alike and one with the same count keeps the row order."""
    files, capture_dir = captured_mixtral(tmp_path)
    path = saliency_path(capture_dir, 0)
    recorded = load_file(str(path))
    atomic_save({name: tensor for name, tensor in recorded.items() if not name.endswith(":token_positions")}, path,
                file_metadata(path))
    saliency = read_token_saliency(capture_dir, 0)
    assert saliency.positions == {}
    assert set(saliency.weights) == set(files.arch.linears)
    with caplog.at_level(logging.WARNING, logger="mobiquant.clip_search"):
        sums, hidden, routing, (_e, _a, _b, f, g) = hessians_with_a_flip(files, capture_dir, monkeypatch, recorded)
    for k in range(EXPERTS):
        tokens = torch.nonzero((routing == k).any(dim=1)).flatten().tolist()
        saliency = recorded[f"mlp.experts.{k}.gate_proj"].double()
        if len(tokens) == len(saliency):
            want = weighted_gram(hidden[tokens], (saliency / saliency.mean()).tolist())
        else:
            assert k in (f, g)
            want = weighted_gram(hidden[tokens], [1.0] * len(tokens))
        torch.testing.assert_close(sums[f"mlp.experts.{k}.gate_proj"], want, rtol=1e-10, atol=1e-12)
    assert "their tokens weigh alike" in caplog.text and "each row keeps its own token's saliency" not in caplog.text
