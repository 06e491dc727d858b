"""An elastic model used as any torch model: pickled, copied, compiled, fine-tuned around, fed padded batches."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mobiquant.checkpoint import LOAD_GUARD, attach_quantizer, mobi_layers, save_checkpoint
from mobiquant.precision import hold_budget, set_precision
from tests.tiny_models import VOCAB, logits, quantize_tiny, set_uniform, tiny_model


def saved_checkpoint(folder: Path, seed: int = 0) -> Path:
    return save_checkpoint(quantize_tiny(tiny_model("llama", seed=seed), seed=seed), folder)


def assert_copy_runs_and_saves_itself(model: torch.nn.Module, copy_of: Callable, folder: Path) -> None:
    """``copy_of(model)`` runs as ``model`` does, and its ``save_pretrained`` writes the copy, with the load guard."""
    twin = copy_of(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    for setting in (2, None):
        set_uniform(model, setting, threshold=1.4)
        set_uniform(twin, setting, threshold=1.4)
        assert torch.equal(logits(twin, ids), logits(model, ids)), setting
    # Changed in the copy only: what is written shows which model save_pretrained is bound to.
    name, layer = next(iter(mobi_layers(twin).items()))
    layer.scale = layer.scale * 2
    twin.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["transformers_weights"] == LOAD_GUARD
    assert torch.equal(load_file(folder / "model.safetensors")[f"{name}.scale"], layer.scale)


def pickled(model: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("copy_of", [pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_a_loaded_and_an_in_memory_model_survive_pickling_and_copying(tmp_path: Path, copy_of: Callable) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(saved_checkpoint(tmp_path / "ckpt", seed=1))
    assert_copy_runs_and_saves_itself(loaded, copy_of, tmp_path / "loaded")
    # What mobiquant.quantize returns (tests/test_api.py pickles one from quantize itself).
    in_memory = attach_quantizer(quantize_tiny(tiny_model("llama", seed=2), seed=2))
    assert_copy_runs_and_saves_itself(in_memory, copy_of, tmp_path / "in-memory")


def test_a_refused_precision_request_keeps_the_budget_hold() -> None:
    model = quantize_tiny(tiny_model("llama", seed=3), seed=3)
    hold = hold_budget(model, 3.0, horizon_tokens=8)
    ids = torch.randint(0, VOCAB, (1, 6))
    for request, error in [({"avg_bits": 9.0}, ValueError), ({"slices": 7}, ValueError),
                           ({"slices": 2.5}, TypeError), ({"avg_bits": "3"}, TypeError)]:
        with pytest.raises(error):
            set_precision(model, **request)
        counted = hold.meter.weighted_tokens
        with torch.no_grad():
            model(ids)
        assert hold.meter.weighted_tokens > counted, request
    set_precision(model, slices=2)
    counted = hold.meter.weighted_tokens
    with torch.no_grad():
        model(ids)
    assert hold.meter.weighted_tokens == counted


def test_torch_compile_runs_a_routed_model_as_it_runs_eagerly() -> None:
    model = quantize_tiny(tiny_model("llama", seed=4), seed=4)
    set_uniform(model, None, threshold=1.5)
    ids = torch.randint(0, VOCAB, (2, 8))
    eager = logits(model, ids)
    try:
        compiled = logits(torch.compile(model), ids)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
