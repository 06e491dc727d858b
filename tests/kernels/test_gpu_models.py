"""Every supported family's tiny model on CUDA: the kernels inside a real model's forward against the same model's
PyTorch path (``MOBIQUANT_KERNELS=off``), uniform at 1, 2 and 4 slices and routed.

The kernel tests (``test_gpu.py``) check each product alone; here the products sit in each family's own blocks
(fused q/k/v of Phi-3, biases of Qwen2, sliding windows of Gemma 2 and 3, experts of the mixtures), in bfloat16 as
most releases run. Skipped without a CUDA device; ``scripts/gpu-check`` runs it.
"""

from __future__ import annotations

import pytest
import torch

from mobiquant.checkpoint import mobi_layers
from tests.tiny_models import MOE_FAMILIES, MORE_FAMILIES, logits, quantize_tiny, set_uniform, tiny_model

FAMILIES = ("llama", "mistral", "qwen2", "opt", *MORE_FAMILIES, *MOE_FAMILIES)
# Relative Frobenius difference of the logits: both paths round every product's output to bfloat16 (8 bits of
# mantissa), in a different order of the sums; 2 blocks of such roundings stay well inside a few 1e-2.
BF16_LOGITS_TOLERANCE = 3e-2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_forward_with_kernels_matches_torch_path(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mobiquant.kernels import _launch

    launches = []
    launch_decode, launch_prefill = _launch.launch_decode, _launch.launch_prefill
    monkeypatch.setattr(_launch, "launch_decode", lambda *args: launches.append(1) or launch_decode(*args))
    monkeypatch.setattr(_launch, "launch_prefill", lambda *args: launches.append(1) or launch_prefill(*args))
    model = quantize_tiny(tiny_model(family, seed=7), seed=7).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(7)).cuda()
    for slices in (1, 2, 4, None):
        set_uniform(model, slices)
        launches.clear()
        with_kernels = logits(model, ids).double()
        assert launches, f"{family}: no kernel launched at {slices} slices"
        monkeypatch.setenv("MOBIQUANT_KERNELS", "off")
        torch_path = logits(model, ids).double()
        monkeypatch.delenv("MOBIQUANT_KERNELS")
        assert torch.isfinite(with_kernels).all(), f"{family} at {slices} slices"
        difference = float((with_kernels - torch_path).norm() / torch_path.norm())
        assert difference <= BF16_LOGITS_TOLERANCE, f"{family} at {slices} slices: {difference:.2e}"
    assert all(layer.planes.is_cuda for layer in mobi_layers(model).values())
