"""CPU checks of bench/quality.py's mixed-precision peer (GPTQ at 2 or 4 bits per linear), on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench.quality import (
    clip_search_gptq,
    mixed_precision_bits,
    output_error_costs,
    print_fp_ratios,
    print_tables,
    record_mixed_peer,
    sequential_peer,
)
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


def _report(ppl: dict[tuple[str, str], tuple[float, float]]) -> dict:
    rows = [{"method": method, "setting": setting, "ppl": {"plays": a, "python docs": b},
             "bits": {"plays": 4.0, "python docs": 4.0}} for (method, setting), (a, b) in ppl.items()]
    return {"rows": rows, "calibration_minutes": {"elastic": {"minutes": 6.0, "minutes_per_block": 0.2}},
            "top10_overlap": {"elastic (GPTQ codes): 2 vs 4 bits": 0.25}}


def test_targets_are_printed_as_ratios_to_their_peers(capsys: pytest.CaptureFixture[str]) -> None:
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    drawn = iter((10 + 90 * torch.rand(64, generator=generator, dtype=torch.float64)).tolist())
    ppl = {("full precision", "fp32"): (next(drawn), next(drawn)), ("RTN", "W2g64"): (next(drawn), next(drawn))}
    ppl |= {("MoBiQuant uniform", f"{k} slices"): (next(drawn), next(drawn)) for k in (1, 2, 3)}
    ppl |= {("MoBiQuant routed", "avg 3 bits"): (next(drawn), next(drawn)),
            ("HQQ", "W4g64"): (next(drawn), next(drawn)),
            ("GPTQ-2/4 by layer, clip search", "avg 3 bits"): (next(drawn), next(drawn))}
    ppl |= {(f"GPTQ-{bits}, {grid}", f"W{bits}g64"): (next(drawn), next(drawn))
            for bits in (2, 3, 4, 6) for grid in ("min-max", "clip search")}
    print_tables(_report(ppl))
    printed = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line.strip("|").split("|")[2:]
               for line in capsys.readouterr().out.splitlines() if line.startswith("| plays") or
               line.startswith("| python docs")}
    for column, text in enumerate(("plays", "python docs")):
        def at(method: str, setting: str, column: int = column) -> float:
            return ppl[(method, setting)][column]

        two = at("MoBiQuant uniform", "2 slices")
        expected = {
            "2 slices / clip-search GPTQ-4 (<= 1.02)": (two / at("GPTQ-4, clip search", "W4g64"), 1.02),
            "2 slices / better of min-max GPTQ-4 and HQQ-4 (<= 0.92)":
                (two / min(at("GPTQ-4, min-max", "W4g64"), at("HQQ", "W4g64")), 0.92),
            "3 slices / full precision (<= 1.01)": (at("MoBiQuant uniform", "3 slices") / at("full precision", "fp32"),
                                                    1.01),
            "routed 3 bits / better GPTQ-3 (< 1)": (at("MoBiQuant routed", "avg 3 bits") / min(
                at("GPTQ-3, min-max", "W3g64"), at("GPTQ-3, clip search", "W3g64")), 1.0),
            "1 slice / better GPTQ-2 (<= 5)": (at("MoBiQuant uniform", "1 slices") / min(
                at("GPTQ-2, min-max", "W2g64"), at("GPTQ-2, clip search", "W2g64")), 5.0),
        }
        for target, (ratio, bound) in expected.items():
            shown, verdict = (cell.strip() for cell in printed[(text, target)])
            assert float(shown) == pytest.approx(ratio, abs=5e-4)
            assert verdict == ("met" if ratio <= bound and (bound != 1.0 or ratio < bound) else "missed")


def test_an_elastic_only_run_prints_each_row_as_a_ratio_to_full_precision(capsys: pytest.CaptureFixture[str]) -> None:
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    drawn = (10 + 90 * torch.rand(6, generator=generator, dtype=torch.float64)).tolist()
    ppl = {("MoBiQuant uniform", "2 slices"): (drawn[0], drawn[1]), ("full precision", "fp32"): (drawn[2], drawn[3]),
           ("MoBiQuant routed", "avg 3 bits"): (drawn[4], drawn[5])}
    print_fp_ratios(_report(ppl)["rows"])
    printed = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]):
               [float(cell) for cell in line.strip("|").split("|")[2:]]
               for line in capsys.readouterr().out.splitlines() if line.startswith("| MoBiQuant")}
    assert printed == {
        ("MoBiQuant uniform", "2 slices"): [round(drawn[0] / drawn[2], 3), round(drawn[1] / drawn[3], 3)],
        ("MoBiQuant routed", "avg 3 bits"): [round(drawn[4] / drawn[2], 3), round(drawn[5] / drawn[3], 3)],
    }
