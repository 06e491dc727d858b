"""The routers fitted anew to an assembled model's weights (mobiquant.calibration.routers), against float64 errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_method import FAST, tiny_llama

from mobiquant.calibration import CalibrationConfig, quantize_model
from mobiquant.calibration.routers import errors_kept, refit_routers
from mobiquant.layers import MoBiLinear
from mobiquant.precision import set_precision
from mobiquant.slicing import SlicedWeight


def routed_layers(model: torch.nn.Module) -> dict[str, MoBiLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoBiLinear) and m.router is not None}


def layer_inputs(model: torch.nn.Module, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every routed layer's input tokens with the model at every slice it holds."""
    seen: dict[str, list[torch.Tensor]] = {}
    layers = routed_layers(model)
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name, layer in layers.items()]
    set_precision(model, slices=4)
    with torch.no_grad():
        model(samples)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def reference_errors(layer: MoBiLinear, x: torch.Tensor) -> torch.Tensor:
    """``||y_e - y_K||^2`` per token in float64, from the layer's own outputs at e and at K slices (the bias
    cancels)."""
    with torch.no_grad():
        finest = layer(x, 4).double()
        return torch.stack([(layer(x, e).double() - finest).pow(2).sum(-1) for e in range(1, 4)], dim=-1)


def ranking_residual(layer: MoBiLinear, x: torch.Tensor) -> float:
    """The router's squared error against the centred float64 log errors, over their variance."""
    target = reference_errors(layer, x).log()
    target = target - target.mean()
    with torch.no_grad():
        logits = layer.router(x).double()
    return float((logits - target).pow(2).mean() / target.var())


def perturb(layer: MoBiLinear, generator: torch.Generator) -> None:
    """What the end-to-end stage does to a layer: every group's scale and zero and the row gains moved."""
    scale = layer.scale.float() * torch.exp(0.5 * torch.randn(layer.scale.shape, generator=generator))
    zero = layer.zero.float() + 0.5 * torch.randn(layer.zero.shape, generator=generator)
    gains = layer.gains.float() * torch.exp(0.3 * torch.randn(layer.gains.shape, generator=generator))
    layer.load_sliced(SlicedWeight(layer.planes, scale, zero, layer.group_size, gains))


def test_errors_kept_are_the_layers_output_errors_against_its_finest_weight_float64(tmp_path: Path) -> None:
    torch.manual_seed(21)
    samples = torch.randint(0, 96, (4, 32))
    model = quantize_model(tiny_llama(5), samples, CalibrationConfig(**FAST), tmp_path / "w", progress=False)
    inputs = layer_inputs(model, samples)
    for name, layer in routed_layers(model).items():
        torch.testing.assert_close(errors_kept(layer, inputs[name]).double(), reference_errors(layer, inputs[name]),
                                   rtol=1e-4, atol=1e-9, msg=name)


def test_refit_routers_rank_the_tokens_by_the_changed_weights_errors(tmp_path: Path) -> None:
    torch.manual_seed(22)
    samples = torch.randint(0, 96, (8, 32))
    model = quantize_model(tiny_llama(6), samples, CalibrationConfig(**FAST), tmp_path / "w", progress=False)
    generator = torch.Generator().manual_seed(23)
    layers = routed_layers(model)
    for layer in layers.values():
        perturb(layer, generator)
    inputs = layer_inputs(model, samples)
    stale = {name: ranking_residual(layer, inputs[name]) for name, layer in layers.items()}
    set_precision(model, slices=2)
    residuals = refit_routers(model, samples, batch_size=2, seed=0, progress=False)
    assert set(residuals) == set(layers)
    refit = {name: ranking_residual(layer, inputs[name]) for name, layer in layers.items()}
    for name in layers:
        # The fit's own residual is the same measure on its sample of these tokens.
        assert residuals[name] == pytest.approx(refit[name], rel=0.3, abs=0.02), name
        assert refit[name] < 0.5 * stale[name], (name, stale[name], refit[name])
        assert refit[name] < 0.2, name
    # The model is as it was: its setting, and routers that take no gradient.
    for layer in layers.values():
        assert layer.uniform_slices == 2
        assert not any(p.requires_grad for p in layer.router.parameters())



def test_routers_fitted_together_get_the_fits_they_get_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from mobiquant.calibration import routers as fits
    from mobiquant.layers import MoBiRouter

    generator = torch.Generator().manual_seed(7)
    # Two shapes and two token counts: three batches, one of them of three routers.
    shapes = [(48, 200), (48, 200), (80, 200), (48, 120), (48, 200)]
    routers = [MoBiRouter(width, 4, 8, torch.Generator().manual_seed(seed)) for seed, (width, _) in enumerate(shapes)]
    xs = [torch.randn(tokens, width, generator=generator) * (0.5 + 4 * torch.rand(tokens, 1, generator=generator))
          for width, tokens in shapes]
    errors = [torch.rand(len(x), 3, generator=generator).pow(3) * torch.tensor([1.0, 0.06, 0.004]) for x in xs]
    initial, alone = copy.deepcopy(routers), copy.deepcopy(routers)
    expected = [fits.fit_routers([router], [x], [e])[0] for router, x, e in zip(alone, xs, errors, strict=True)]
    # At most two routers' tokens a batch: the batch of three is split.
    monkeypatch.setattr(fits, "ROUTER_BATCH_ELEMENTS", 2 * 200 * 48)
    residuals = fits.fit_routers(routers, xs, errors)
    assert residuals == pytest.approx(expected, rel=1e-5)
    for together, by_itself, start in zip(routers, alone, initial, strict=True):
        for name, fitted in together.named_parameters():
            torch.testing.assert_close(fitted, by_itself.get_parameter(name), rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(together.fc1.weight, start.fc1.weight)  # fitted, from its own start
