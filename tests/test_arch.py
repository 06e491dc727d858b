"""Architectures as data, on tiny random models of each supported family."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config

from mobiquant.arch import UnsupportedArchitectureError, architecture_for, architecture_of
from mobiquant.calibration import CalibrationConfig, quantize_files
from mobiquant.calibration.capture import block_outputs
from mobiquant.checkpoint import load_checkpoint, mobi_layers, save_checkpoint
from mobiquant.layers import MoBiLinear
from mobiquant.precision import set_precision
from mobiquant.streaming import first_block_inputs
from tests.tiny_models import (
    MOE_FAMILIES,
    MORE_FAMILIES,
    SLICES,
    VOCAB,
    logits,
    quantize_tiny,
    set_uniform,
    tiny_model,
)

FAMILIES = ("llama", "mistral", "qwen2", "opt", *MORE_FAMILIES, *MOE_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_description_finds_every_block_and_linear(family: str) -> None:
    model = tiny_model(family)
    arch = architecture_of(model.config)
    arch.linearize(model)
    blocks = arch.block_list(model)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == model.config.num_hidden_layers
    state = model.state_dict()
    for index, block in enumerate(blocks):
        linears = arch.quantized_linears(block)
        # Every linear of a block is quantized: none is left behind at full precision by mistake (but a gate the
        # description keeps on purpose, Qwen2-MoE's shared_expert_gate).
        in_block = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)} - set(arch.kept)
        assert set(linears) == in_block
        for name, linear in linears.items():
            assert isinstance(linear, nn.Linear)
            assert torch.equal(state[f"{arch.block_prefix(index)}{name}.weight"], linear.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_replaced_model_runs_the_dequantized_weights(family: str) -> None:
    """At k slices, the model with MoBiLinear layers equals the original model with each weight replaced by W_k."""
    model = tiny_model(family, seed=1)
    reference = copy.deepcopy(model)
    quantized = quantize_tiny(model, seed=1)
    arch = architecture_of(quantized.config)
    arch.linearize(reference)
    layers = mobi_layers(quantized)
    assert len(layers) == len(arch.linears) * quantized.config.num_hidden_layers
    ids = torch.randint(0, VOCAB, (2, 11))
    for k in range(1, SLICES + 1):
        for i, block in enumerate(arch.block_list(reference)):
            for name, linear in arch.quantized_linears(block).items():
                layer = layers[f"{arch.block_prefix(i)}{name}"]
                assert (layer.bias is None) == (linear.bias is None)
                with torch.no_grad():
                    linear.weight.copy_(layer.sliced_weight().dequantize(k))
        set_uniform(quantized, k)
        torch.testing.assert_close(logits(quantized, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_precision_changes_the_output(family: str) -> None:
    quantized = quantize_tiny(tiny_model(family, seed=2), seed=2)
    ids = torch.randint(0, VOCAB, (1, 9))
    set_uniform(quantized, 1)
    low = logits(quantized, ids)
    set_uniform(quantized, SLICES)
    high = logits(quantized, ids)
    assert not torch.allclose(low, high)
    assert all(isinstance(m, MoBiLinear) for m in mobi_layers(quantized).values())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_replayed_with_its_own_arguments_gives_the_models_outputs(family: str) -> None:
    """Block 0's recorded inputs run through every block with that block's recorded arguments give what each block
    outputs in the model's own forward pass: sliding-window layers keep their own masks (and Gemma 3's local layers
    their own rotary embeddings) on sequences longer than the window."""
    model = tiny_model(family, seed=3)
    arch = architecture_of(model.config)
    arch.linearize(model)
    ids = torch.randint(0, VOCAB, (3, 32))
    blocks = arch.block_list(model)
    outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple)
                                                                              else out)) for block in blocks]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    hidden, block_kwargs = first_block_inputs(model, arch, ids)
    for index, block in enumerate(blocks):
        hidden = block_outputs(block, hidden, block_kwargs.for_block(index), 2, torch.float32)
        torch.testing.assert_close(hidden, outputs[index], rtol=0, atol=1e-6, msg=f"block {index}")


def test_unsupported_family_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'") as raised:
        architecture_for(GPT2Config().model_type)
    message = str(raised.value)
    assert "\n" not in message
    listed = message.partition("; supported: ")[2].split(", ")
    assert set(listed) == set(FAMILIES) and len(listed) == len(set(listed))


def test_per_linear_weights_name_only_linears_the_architecture_has() -> None:
    phi3 = architecture_for("phi3")
    # The v_proj default weighs nothing where there is no v_proj: the fused qkv_proj takes the shared weights.
    config = CalibrationConfig()
    assert config.compensation_objective("self_attn.qkv_proj") == config.compensation_objective("mlp.down_proj")
    assert config.compensation_objective("self_attn.v_proj") != config.compensation_objective("mlp.down_proj")
    CalibrationConfig(module_precision_weights={"qkv_proj": (1, 1, 1, 1)}).check_linear_names(phi3)
    with pytest.raises(ValueError, match="'v_proj', which is not a quantized linear of phi3") as raised:
        CalibrationConfig(module_precision_weights={"v_proj": (1, 1, 1, 1)}).check_linear_names(phi3)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "gemma2"])
def test_quantize_save_load_generate(family: str, tmp_path: Path) -> None:
    """A model folder calibrated block by block (meta-device stem; eager attention for Gemma 2, which has no
    SDPA), saved, loaded and generating; at 4 slices (8 bits) its logits are close to the float model's."""
    model = tiny_model(family, seed=4)
    model.save_pretrained(tmp_path / "source")
    samples = torch.randint(0, VOCAB, (4, 32))
    config = CalibrationConfig(group_size=32, router_hidden=16, epochs_stage1=1, epochs_stage2=1, batch_size=4)
    quantized = quantize_files(tmp_path / "source", samples, config, tmp_path / "work", model_key="k",
                               device=torch.device("cpu"), progress=False)
    save_checkpoint(quantized, tmp_path / "checkpoint")
    loaded = load_checkpoint(tmp_path / "checkpoint")
    assert len(mobi_layers(loaded)) == len(architecture_for(family).linears) * model.config.num_hidden_layers
    ids = torch.randint(0, VOCAB, (2, 32))
    reference = logits(model, ids)
    errors = {}
    for k in (1, SLICES):
        set_precision(loaded, slices=k)
        errors[k] = float((logits(loaded, ids) - reference).pow(2).mean())
    assert errors[SLICES] < 0.05 * float(reference.var()) and errors[SLICES] < errors[1] / 20, errors
    set_precision(loaded, avg_bits=4.0)
    with torch.no_grad():
        generated = loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


@pytest.mark.parametrize(("family", "attention"), [("llama", "sdpa"), ("gemma2", "eager")])
def test_a_source_saved_with_an_attention_this_machine_lacks_still_opens(
    family: str, attention: str, tmp_path: Path
) -> None:
    from mobiquant.model_files import ModelFiles

    tiny_model(family, seed=3).save_pretrained(tmp_path / "src")
    # As some Hub configs carry it (saved from a training run with flash-attn).
    config_file = tmp_path / "src" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "_attn_implementation": "flash_attention_2"}))
    files = ModelFiles(tmp_path / "src")
    assert files.stem(torch.device("cpu")).config._attn_implementation == attention
