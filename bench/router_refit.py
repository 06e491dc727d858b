"""Routed rows after the end-to-end stage: the blocks' routers against routers fitted again to the tuned weights.

The end-to-end stage moves every group's scale and zero and the row gains after the blocks fitted their routers;
the calibration now fits the routers again to the tuned weights (``mobiquant.calibration.routers``). This script
calibrates SmolLM2 as ``bench/quality.py`` does with the stage (resumable, the same work folder: a quality run's
blocks and stage are read back), then evaluates one model with the refit routers and one with the blocks'
routers put back, thresholds fitted for each on the calibration samples, routed at every budget of the quality
bench, plain and with the budget held, on both texts of the quality bench, side by side in one run:

    python bench/router_refit.py --out bench/results/router_refit.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout, or another checkout's mobiquant installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.quality import ROUTED_BITS, ppl, python_docs_text, token_nll  # noqa: E402
from mobiquant.arch import architecture_of  # noqa: E402
from mobiquant.calibration import CalibrationConfig, quantize_model  # noqa: E402
from mobiquant.calibration.config import END_TO_END_DTYPES, END_TO_END_SCHEDULES  # noqa: E402
from mobiquant.calibration.store import load_block_result, result_path  # noqa: E402
from mobiquant.data import calibration_samples, evaluation_tokens  # noqa: E402
from mobiquant.precision import calibrate_thresholds, hold_budget, mobi_layers, set_precision, track_bits  # noqa: E402
from mobiquant.sources import materialize, smollm2_gguf_path  # noqa: E402


def with_block_routers(model: nn.Module, blocks_dir: Path, samples: torch.Tensor) -> nn.Module:
    """A copy of the tuned ``model`` with every router as its block's calibration left it, thresholds fitted anew."""
    stale = copy.deepcopy(model)
    arch = architecture_of(stale.config)
    for index, block in enumerate(arch.block_list(stale)):
        state = load_block_result(result_path(blocks_dir, index))
        for name, layer in arch.quantized_linears(block).items():
            prefix = f"{name}.router."
            layer.router.load_state_dict({key[len(prefix):]: value for key, value in state.items()
                                          if key.startswith(prefix)})
    calibrate_thresholds(stale, samples)
    return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--end-to-end-steps", type=int, default=48)
    parser.add_argument("--end-to-end-lr", type=float, default=1e-3)
    parser.add_argument("--end-to-end-dtype", choices=END_TO_END_DTYPES, default="float32")
    parser.add_argument("--end-to-end-schedule", choices=END_TO_END_SCHEDULES, default="rotate")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "mobiquant" / "bench-quality")
    parser.add_argument("--out", type=Path, default=Path("bench/results/router_refit.json"))
    args = parser.parse_args()
    if args.end_to_end_steps < 1:
        parser.error("--end-to-end-steps must be at least 1: without the stage there is nothing to refit")

    source = materialize(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    architecture_of(base.config).linearize(base)
    samples = calibration_samples(tokenizer, "shakespeare:train", args.samples, args.seqlen, args.seed)
    texts = {"plays": evaluation_tokens(tokenizer, "shakespeare:test"),
             "python docs": tokenizer(python_docs_text(), return_tensors="pt", verbose=False).input_ids}
    # bench/quality.py's elastic settings (sequential mode), so both share one work folder.
    config = CalibrationConfig(group_size=args.group_size, seed=args.seed, mode="sequential",
                               end_to_end_steps=args.end_to_end_steps, end_to_end_lr=args.end_to_end_lr,
                               end_to_end_dtype=args.end_to_end_dtype, end_to_end_schedule=args.end_to_end_schedule)
    work_dir = args.work_dir / f"elastic-{config.digest()}"
    started = time.perf_counter()
    models = {"routers refit": quantize_model(copy.deepcopy(base), samples, config, work_dir)}
    finished = time.perf_counter() - started
    models["blocks' routers"] = with_block_routers(models["routers refit"], work_dir / "blocks", samples)
    for model in models.values():
        for layer in mobi_layers(model):
            layer.cache_dense = True  # one dense W_k per slice count in use: the evaluation's speed, not its result
    report: dict = {"settings": vars(args) | {"work_dir": str(args.work_dir), "out": str(args.out)},
                    "calibration_seconds_this_run": finished, "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print("| budget | routers | " + " | ".join(f"{text} ppl (bits)" for text in texts) + " |")
    print("|---|---|" + "---|" * len(texts))
    for held in (False, True):
        for bits in ROUTED_BITS:
            measured = {}
            for variant, model in models.items():
                row = {"routers": variant, "budget": bits, "held": held, "ppl": {}, "bits": {}}
                for name, tokens in texts.items():
                    set_precision(model, avg_bits=bits)
                    with hold_budget(model, bits) if held else torch.no_grad(), track_bits(model) as meter:
                        row["ppl"][name] = ppl(token_nll(model, tokens, args.eval_seqlen, args.eval_windows))
                    row["bits"][name] = meter.avg_bits
                measured[variant] = row
                report["rows"].append(row)
                args.out.write_text(json.dumps(report, indent=2))
                cells = " | ".join(f"{row['ppl'][t]:.2f} ({row['bits'][t]:.2f})" for t in texts)
                print(f"| {bits:g}{' held' if held else ''} | {variant} | {cells} |", flush=True)
            refit, stale = measured["routers refit"]["ppl"], measured["blocks' routers"]["ppl"]
            ratios = ", ".join(f"{t} {refit[t] / stale[t]:.3f}" for t in texts)
            print(f"|   | refit / blocks' | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
