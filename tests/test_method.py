"""The elastic linear layer, run-time precision and block-wise calibration, on tiny random models."""

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import mobiquant.calibration as calibration
import mobiquant.calibration.driver as driver
from mobiquant import slicing
from mobiquant.arch import Architecture, architecture_for
from mobiquant.calibration import CalibrationConfig, quantize_model
from mobiquant.calibration.capture import block_outputs
from mobiquant.layers import UNCALIBRATED, MoBiLinear, gate_scores, ordered_scores, slices_from_scores
from mobiquant.precision import mobi_layers, set_precision, threshold_for_bits, track_bits
from mobiquant.slicing import slice_weight
from mobiquant.streaming import first_block_inputs


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    return OPTForCausalLM(config).eval()


FAST = {"group_size": 32, "epochs_stage1": 1, "epochs_stage2": 2, "batch_size": 2}


def test_each_token_gets_its_own_precision_float64() -> None:
    weight, bias = torch.randn(40, 96), torch.randn(40)
    sliced = slice_weight(weight, group_size=32, num_slices=4)
    layer = MoBiLinear(96, 40, 4, 32, bias=True)
    layer.load_sliced(sliced, bias)
    x = torch.randn(3, 7, 96)
    slices = torch.randint(1, 5, (3, 7))
    out = layer(x, slices)
    for i in range(3):
        for t in range(7):
            k = int(slices[i, t])
            expected = x[i, t].double() @ sliced.dequantize(k, torch.float64).T + bias.double()
            torch.testing.assert_close(out[i, t].double(), expected, rtol=1e-5, atol=1e-5)
    layer.uniform_slices = 3
    torch.testing.assert_close(layer(x), x @ sliced.dequantize(3).T + bias)


def test_whole_number_threshold_runs_uniform_without_its_router() -> None:
    sliced = slice_weight(torch.randn(24, 64), group_size=32, num_slices=4)
    layer = MoBiLinear(64, 24, 4, 32)
    layer.load_sliced(sliced)
    layer.uniform_slices = None
    x = torch.randn(5, 64)
    layer.router.forward = lambda _x: pytest.fail("the router ran at a whole-number threshold")
    for threshold, k in ((UNCALIBRATED, 1), (3.0, 1), (2.0, 2), (1.0, 3), (0.0, 4), (-5.0, 4)):
        layer.threshold = threshold
        torch.testing.assert_close(layer(x), x @ sliced.dequantize(k).T)


def test_ordered_scores_fill_one_slice_level_at_a_time() -> None:
    logits = torch.randn(200, 3) * 4
    nested = torch.cummin(logits, dim=-1).values
    scores = ordered_scores(logits)
    for level in (1, 2, 3):
        for fraction in (0.1, 0.5, 0.9):
            # The router's choice of tokens for the next slice: the top fraction by that gate's nested score.
            chosen = torch.topk(nested[:, level - 1], int(fraction * 200)).indices
            expected = torch.full((200,), level)
            expected[chosen] = level + 1
            cut = torch.sort(scores[:, level - 1], descending=True).values[len(chosen) - 1 : len(chosen) + 1].mean()
            assert torch.equal(slices_from_scores(scores, cut), expected)


def test_keep_slices_drops_planes_and_keeps_lower_precisions() -> None:
    layer = MoBiLinear(64, 16, 4, 32, router_hidden=None)
    layer.load_sliced(slice_weight(torch.randn(16, 64), group_size=32))
    x = torch.randn(5, 64)
    before = layer(x, 2)
    layer.keep_slices(2)
    assert layer.planes.shape[0] == 4
    torch.testing.assert_close(layer(x, 2), before)
    with pytest.raises(ValueError, match="slice counts"):
        layer(x, 3)


def test_threshold_gives_exact_count_on_its_data() -> None:
    scores = ordered_scores(torch.randn(1000, 3))
    for bits in (2.5, 3.0, 4.4, 5.0, 7.9):
        theta = threshold_for_bits(scores, bits)
        mean_slices = slices_from_scores(scores, theta).double().mean()
        # Exact up to rounding the wanted count to whole tokens.
        assert float(2 * mean_slices) == pytest.approx(bits, abs=2 * 0.5 / 1000 + 1e-12)
    for bits, whole in ((2.0, 3.0), (4.0, 2.0), (6.0, 1.0), (8.0, 0.0)):
        assert threshold_for_bits(scores, bits) == whole


def _tokens_with_active_channels(count: int, features: int) -> torch.Tensor:
    """Tokens that each excite a few random input channels strongly: their truncation errors differ."""
    x = 0.1 * torch.randn(count, features)
    active = torch.rand(count, features) < 0.1
    return x + active * torch.randn(count, features) * 3


def _error_left(errors: torch.Tensor, scores: torch.Tensor, gates_on: int) -> float:
    """Total output error when the ``gates_on`` highest nested scores get their residual slice."""
    nested = gate_scores(scores)
    cut = torch.sort(nested.flatten(), descending=True).values[gates_on - 1]
    on = (nested >= cut).sum(dim=-1)
    left = torch.cat([errors, torch.zeros(len(errors), 1)], dim=-1)
    return float(left.gather(1, on[:, None]).sum())


def test_fitted_router_spends_slices_where_they_remove_most_error() -> None:
    # Seeded so the outcome does not depend on which tests ran before (a rare draw misses the 1.3x margin).
    torch.manual_seed(7)
    features, out_features = 96, 48
    # Heavy-tailed weights: tokens that excite the columns holding outliers lose most at few slices.
    weight = torch.distributions.StudentT(2.0).sample((out_features, features)) * 0.05
    linear = torch.nn.Linear(features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    config = CalibrationConfig(group_size=32, router_hidden=32, num_slices=4)
    module = calibration.TrainableSlicedLinear(linear, config)
    block = torch.nn.Sequential(module)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    residuals = calibration.fit_routers_to_errors(
        block, {"0": module}, _tokens_with_active_channels(2048, features), {}, config, generator
    )
    assert residuals[0] < 0.2, residuals

    fresh = _tokens_with_active_channels(1000, features)
    # Independent reference: each token's error at 1..3 slices, in float64 from the formulas.
    sliced = slicing.slice_weight(weight, 32, 4, clip=tuple(f.detach() for f in module.clip_factors()))
    errors = torch.stack(
        [(fresh.double() @ (sliced.dequantize(k).double() - weight.double()).T).pow(2).sum(dim=-1) for k in (1, 2, 3)],
        dim=-1,
    )
    with torch.no_grad():
        routed = module.router(fresh)
    half = fresh.shape[0] * 3 // 2  # 3 bits: half of the residual gates on
    oracle = _error_left(errors, errors.log(), half)
    fitted = _error_left(errors, routed.double(), half)
    random_scores = torch.rand(errors.shape, dtype=torch.float64).sort(dim=-1, descending=True).values
    random = _error_left(errors, random_scores, half)
    assert fitted < 0.7 * random, (fitted, random)
    assert fitted < 1.3 * oracle, (fitted, oracle)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, torch.Tensor, torch.Tensor]:
    model = tiny_llama(seed=int(torch.randint(0, 10_000, ())))
    samples = torch.randint(0, 96, (8, 32))
    reference = model(samples).logits
    quantized = quantize_model(model, samples, CalibrationConfig(**FAST), tmp_path_factory.mktemp("w"),
                               progress=False)
    return quantized, samples, reference


def test_set_precision_hits_budget_on_calibration_data(calibrated: tuple) -> None:
    model, samples, _ = calibrated
    for bits in (2.5, 3.0, 4.0, 5.5, 7.0):
        set_precision(model, avg_bits=bits)
        with track_bits(model) as meter:
            model(samples)
        assert meter.avg_bits == pytest.approx(bits, abs=0.05)
    assert model.config.quantization_config["threshold_order"] == "slice-major"


def test_budgets_between_grid_points_move_the_bits_monotonically(calibrated: tuple) -> None:
    model, samples, _ = calibrated
    measured = []
    for bits in torch.arange(2.0, 8.01, 0.1).tolist():
        set_precision(model, avg_bits=bits)
        with track_bits(model) as meter:
            model(samples)
        measured.append(meter.avg_bits)
    assert measured == sorted(measured)
    assert measured[0] == 2.0 and measured[-1] == 8.0


def test_uniform_precision_error_shrinks_with_slices(calibrated: tuple) -> None:
    model, samples, reference = calibrated
    errors = []
    for k in range(1, 5):
        set_precision(model, slices=k)
        with track_bits(model) as meter, torch.no_grad():
            errors.append(float((model(samples).logits - reference).pow(2).mean()))
        assert meter.avg_bits == 2 * k
    assert errors == sorted(errors, reverse=True)


def test_bad_precision_requests_are_refused(calibrated: tuple) -> None:
    model, _, _ = calibrated
    with pytest.raises(ValueError, match="avg_bits must be in"):
        set_precision(model, avg_bits=9.0)
    with pytest.raises(ValueError, match="slices must be in"):
        set_precision(model, slices=5)
    with pytest.raises(ValueError, match="exactly one"):
        set_precision(model)
    # A table from before slice-major thresholds holds raw logits (its top budget was -1e9): not reused.
    stale = copy.deepcopy(model)
    for layer in mobi_layers(stale):
        layer.thresholds = torch.linspace(1.5, -1.0e9, len(layer.thresholds))
    with pytest.raises(ValueError, match="calibrate_thresholds again"):
        set_precision(stale, avg_bits=3.0)


def heavy_tailed_block(sample_weight: Callable[[tuple[int, ...]], torch.Tensor]) -> tuple:
    """Block 1 of a fresh tiny Llama with heavy-tailed weights (as trained LLMs have), its inputs and FP outputs."""
    model = tiny_llama(seed=int(torch.randint(0, 10_000, ())))
    arch = architecture_for("llama")
    first_inputs, all_kwargs = first_block_inputs(model, arch, torch.randint(0, 96, (16, 32)))
    inputs = block_outputs(arch.block_list(model)[0], first_inputs, all_kwargs.for_block(0), 4, torch.float32)
    block_kwargs = all_kwargs.for_block(1)
    block = arch.block_list(model)[1]
    with torch.no_grad():
        for linear in arch.quantized_linears(block).values():
            linear.weight.copy_(sample_weight(tuple(linear.weight.shape)))
    targets = block_outputs(block, inputs, block_kwargs, 4, torch.float32)
    return arch, block, inputs, block_kwargs, targets


def linear_inputs(arch: Architecture, block: nn.Module, inputs: torch.Tensor,
                  block_kwargs: dict) -> dict[str, torch.Tensor]:
    """Each quantized linear's input rows, ``[tokens, in]``, in the order a batched pass over ``inputs`` feeds them."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [linear.register_forward_pre_hook(
        lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name, linear in arch.quantized_linears(block).items()]
    try:
        block_outputs(block, inputs, block_kwargs, 4, torch.float32)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def one_slice_block_error(setup: tuple, config: CalibrationConfig) -> float:
    """Output MSE of the block calibrated with ``config``, run at one slice, against its FP outputs."""
    arch, block, inputs, block_kwargs, targets = setup
    result = calibration.calibrate_block(block, inputs, block_kwargs, arch, config, progress=False)
    quantized = calibration.quantized_block(tiny_llama(0).model.layers[1].float(), arch, result.state, config)
    for layer in mobi_layers(quantized):
        layer.uniform_slices = 1
    return float((block_outputs(quantized, inputs, block_kwargs, 4, torch.float32) - targets).pow(2).mean())


def test_learned_clipping_lowers_the_block_error_from_its_start() -> None:
    # Clipping heavy-tailed outliers is what LWC learns at 2 bits.
    setup = heavy_tailed_block(lambda shape: torch.distributions.StudentT(2.0).sample(shape) * 0.05)
    errors = {}
    for epochs in (0, 6):
        config = CalibrationConfig(group_size=32, epochs_stage1=epochs, epochs_stage2=0, batch_size=1,
                                   target_bits=2.0, clip_init=4.0, lr_clip=1e-2,
                                   clip_search=False, error_compensation=False)
        errors[epochs] = one_slice_block_error(setup, config)
    assert errors[6] < errors[0], errors


def test_calibration_is_deterministic_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = torch.randint(0, 96, (4, 32))
    config = CalibrationConfig(**FAST)
    first = quantize_model(tiny_llama(3), samples, config, tmp_path / "a", progress=False)
    second = quantize_model(tiny_llama(3), samples, config, tmp_path / "b", progress=False)
    for left, right in zip(mobi_layers(first), mobi_layers(second), strict=True):
        for key, tensor in left.state_dict().items():
            assert torch.equal(tensor, right.state_dict()[key]), key

    (tmp_path / "a" / "blocks" / "block_0001.safetensors").unlink()
    calibrated_blocks = []
    original = driver.calibrate_block

    def counting(*args: object, **kwargs: object) -> calibration.BlockResult:
        calibrated_blocks.append(kwargs.get("block_index", args[6] if len(args) > 6 else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(driver, "calibrate_block", counting)
    resumed = quantize_model(tiny_llama(3), samples, config, tmp_path / "a", progress=False)
    assert calibrated_blocks == [1]
    assert torch.equal(load_file(str(tmp_path / "a" / "blocks" / "block_0001.safetensors"))["mlp.up_proj.planes"],
                       load_file(str(tmp_path / "b" / "blocks" / "block_0001.safetensors"))["mlp.up_proj.planes"])
    assert all(torch.equal(a.planes, b.planes) for a, b in zip(mobi_layers(resumed), mobi_layers(second), strict=True))


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
def test_both_modes_on_both_families(tmp_path: Path, mode: str, build: object) -> None:
    model = build(seed=int(torch.randint(0, 10_000, ())))
    samples = torch.randint(4, 96, (4, 32))
    with torch.no_grad():
        reference = model(samples).logits
    quantized = quantize_model(model, samples, CalibrationConfig(**FAST, mode=mode), tmp_path, progress=False)
    assert len(mobi_layers(quantized)) == 2 * len(architecture_for(model.config.model_type).linears)
    with torch.no_grad():
        set_precision(quantized, slices=4)
        top = float((quantized(samples).logits - reference).pow(2).mean())
        set_precision(quantized, slices=1)
        bottom = float((quantized(samples).logits - reference).pow(2).mean())
    assert top < bottom


def test_shapes_are_checked_before_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a multiple of group_size 128"):
        quantize_model(tiny_llama(0), torch.randint(0, 96, (2, 16)), CalibrationConfig(group_size=128), tmp_path)
    assert not (tmp_path / "capture").exists()


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        CalibrationConfig(mode="diagonal")
    with pytest.raises(ValueError, match="target_bits"):
        CalibrationConfig(target_bits=3.0)
    with pytest.raises(ValueError, match="unknown calibration options"):
        CalibrationConfig.from_dict({"epochs": 3})
    for option in ("gain_aware_passes", "descent_sweeps"):
        with pytest.raises(ValueError, match=f"{option} must be a whole number >= 0"):
            CalibrationConfig(**{option: -1})
    with pytest.raises(ValueError, match="router_hidden must be >= 0"):
        CalibrationConfig(router_hidden=-1)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [("group_size", "128", "a whole number"), ("batch_size", 2.5, "a whole number"),
     ("descent_sweeps", True, "a whole number"), ("num_slices", True, "a whole number"),
     ("lr_clip", "x", "a number"), ("damp", "0.1", "a number"), ("target_bits", "4", "a number"),
     ("clip_search", 1, "True or False"), ("mode", 2, "a string")],
)
def test_options_of_the_wrong_type_are_refused_by_name(option: str, value: object, expected: str) -> None:
    with pytest.raises(TypeError, match=f"^{option} must be {expected}, got {value!r}$"):
        CalibrationConfig(**{option: value})


def test_numbers_of_either_kind_and_unset_options_are_accepted() -> None:
    config = CalibrationConfig(lr_clip=1, damp=1, target_bits=4, precision_weights=None)
    assert (config.lr_clip, config.damp, config.target_bits) == (1, 1, 4)
