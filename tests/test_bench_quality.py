"""CPU checks of bench/quality.py's mixed-precision peer (GPTQ at 2 or 4 bits per linear), on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench.quality import clip_search_gptq, mixed_precision_bits, output_error_costs, record_mixed_peer, sequential_peer
from mobiquant.arch import architecture_for
from tests.tiny_models import GROUP, VOCAB, tiny_model


def test_mixed_precision_bits_moves_the_cheapest_loss_per_parameter_first() -> None:
    params = {"a": 100, "b": 300, "c": 100, "d": 500}
    # Loss increase per parameter when moved from 4 to 2 bits: a 0.5, b 0.1, c 2.0, d 0.3.
    costs = {"a": {2: 60.0, 4: 10.0}, "b": {2: 31.0, 4: 1.0}, "c": {2: 200.0, 4: 0.0}, "d": {2: 160.0, 4: 10.0}}
    # In that order, b (4 - 2 * 300 / 1000 = 3.4) moves; d would take the average to 2.4 and stays; a (3.2) and
    # c (3.0) move.
    assert mixed_precision_bits(costs, params, 2, 4, 3.0) == {"a": 2, "b": 2, "c": 2, "d": 4}
    assert mixed_precision_bits(costs, params, 2, 4, 3.3) == {"a": 4, "b": 2, "c": 4, "d": 4}
    bits = mixed_precision_bits(costs, params, 2, 4, 3.0)
    average = sum(bits[key] * params[key] for key in params) / sum(params.values())
    assert average >= 3.0
    assert mixed_precision_bits(costs, params, 2, 4, 4.0) == dict.fromkeys(params, 4)
    assert mixed_precision_bits(costs, params, 2, 4, 2.0) == dict.fromkeys(params, 2)


def _float64_costs(base: torch.nn.Module, samples: torch.Tensor, quantized: dict[int, torch.nn.Module]
                   ) -> dict[tuple[int, str], dict[int, float]]:
    """The same estimate computed independently: one float64 backward of the whole batch, retained output grads."""
    model = copy.deepcopy(base).double()
    arch = architecture_for(model.config.model_type)
    inputs, outputs = {}, {}
    linears = {(index, name): linear for index, block in enumerate(arch.block_list(model))
               for name, linear in arch.quantized_linears(block).items()}

    def keep(key: tuple[int, str]):
        def hook(_module, args, output):
            inputs[key] = args[0].detach()
            output.retain_grad()
            outputs[key] = output
        return hook

    handles = [linear.register_forward_hook(keep(key)) for key, linear in linears.items()]
    logits = model(input_ids=samples, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), samples[:, 1:].reshape(-1), reduction="sum").backward()
    for handle in handles:
        handle.remove()
    costs = {}
    for key, linear in linears.items():
        costs[key] = {}
        for bits, other in quantized.items():
            delta = arch.quantized_linears(arch.block_list(other)[key[0]])[key[1]].weight.double() - linear.weight
            change = inputs[key] @ delta.T
            costs[key][bits] = float(0.5 * (outputs[key].grad.pow(2) * change.detach().pow(2)).sum())
    return costs


def test_output_error_costs_match_a_float64_reference() -> None:
    torch.manual_seed(1)
    base = tiny_model("llama", seed=3)
    arch = architecture_for("llama")
    quantized = {}
    for bits, noise in ((2, 0.05), (4, 0.01)):
        quantized[bits] = copy.deepcopy(base)
        with torch.no_grad():
            for block in arch.block_list(quantized[bits]):
                for linear in arch.quantized_linears(block).values():
                    linear.weight.add_(noise * torch.randn_like(linear.weight))
    samples = torch.randint(0, VOCAB, (6, 16))
    costs = output_error_costs(base, arch, samples, quantized, batch_size=4)
    reference = _float64_costs(base, samples, quantized)
    assert costs.keys() == reference.keys() and len(costs) == 14
    for key in costs:
        for bits in (2, 4):
            assert costs[key][bits] == pytest.approx(reference[key][bits], rel=1e-3)
        assert costs[key][2] > costs[key][4]


def test_mixed_peer_holds_the_budget_and_uses_only_the_two_grids() -> None:
    torch.manual_seed(2)
    base = tiny_model("llama", seed=4)
    arch = architecture_for("llama")
    samples = torch.randint(0, VOCAB, (4, 16))
    quantizers = {bits: clip_search_gptq(bits, GROUP, 0.1) for bits in (2, 4)}
    clip_searched = {bits: sequential_peer(base, arch, samples, lambda _i, _n, bits=bits: quantizers[bits])[""]
                     for bits in (2, 4)}
    rows = []
    share = record_mixed_peer(base, arch, samples, clip_searched, 0.1, GROUP, {},
                              lambda method, setting, model, bits: rows.append((model, bits)))
    (mixed, average), = rows
    assert 3.0 <= average < 3.5
    assert {name.split(".")[-1] for name in share} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                        "down_proj"}
    assert max(share.values()) > 0.0
    low_params = 0
    total = 0
    for block in arch.block_list(mixed):
        for linear in arch.quantized_linears(block).values():
            levels = max(len(torch.unique(group)) for row in linear.weight.detach() for group in row.split(GROUP))
            # A 2-bit linear holds at most 4 levels per group; a 4-bit one more (random weights use them).
            assert levels <= 16
            low_params += linear.weight.numel() * (levels <= 4)
            total += linear.weight.numel()
    assert average == pytest.approx(4.0 - 2.0 * low_params / total)
