"""The calibration makes no tensor on the default device where it meets the model's tensors.

On a GPU such a tensor lands on the host, and its first product with a CUDA tensor fails: the clip search's
slice weights and candidates did, the first time the calibration ran on an H200. CI has no GPU, so here the
default device is meta: a tensor made without a device then meets the CPU model's tensors and raises at once,
as it would meet CUDA tensors on a GPU. Modules are still built on the host and moved (the usual way; their
parameters are made on the default device before ``.to``), so their constructors run with the CPU as default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from mobiquant.calibration import CalibrationConfig, quantize_model
from mobiquant.layers import MoBiRouter
from mobiquant.precision import set_precision
from tests.tiny_models import tiny_model


def _built_on_the_host(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def wrapped(self: nn.Module, *args: object, **kwargs: object) -> None:
        with torch.device("cpu"):
            init(self, *args, **kwargs)

    return wrapped


@pytest.fixture
def meta_default_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for module in (nn.Linear, nn.Embedding, nn.LayerNorm, MoBiRouter):
        monkeypatch.setattr(module, "__init__", _built_on_the_host(module.__init__))
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_the_detector_catches_a_tensor_made_without_a_device(meta_default_device: None) -> None:
    weight = torch.ones(3, device="cpu")
    with pytest.raises((RuntimeError, NotImplementedError)):
        weight * torch.tensor([1.0, 2.0, 3.0])  # what the clip search did with its slice weights


@pytest.mark.parametrize(("family", "end_to_end_steps"), [("llama", 2), ("mixtral", 0)])
def test_calibration_and_routing_make_every_tensor_on_the_model_device(
    family: str, end_to_end_steps: int, tmp_path: Path, meta_default_device: None
) -> None:
    torch.set_default_device(None)  # the model and its samples are the caller's, made before
    model = tiny_model(family)
    samples = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    torch.set_default_device("meta")
    config = CalibrationConfig(group_size=32, router_hidden=16, end_to_end_steps=end_to_end_steps,
                               end_to_end_schedule="rotate")
    quantized = quantize_model(model, samples, config, tmp_path, device="cpu", progress=False)
    set_precision(quantized, avg_bits=3.0)
    with torch.no_grad():
        logits = quantized(samples[:2]).logits
    assert logits.device.type == "cpu" and torch.isfinite(logits).all()
