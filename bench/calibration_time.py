"""Calibration time per block: today's default against the calibration before error compensation, one run.

Issue 16 bounds the default's calibration time at 1.5x what a block took before the compensated codes, on the
same machine. Earlier sessions divided by 0.21 min per block, measured once on another machine; machines here
differ by 20% from day to day, so this script times both on the same blocks, inputs and threads, alternating
which runs first, and prints the ratio:

* **before compensation**: clip search, LWC, floor codes, router fit and stage 2 (``error_compensation=False``,
  every token alike in the clip search's Hessian; issue 16's starting point);
* **default**: ``CalibrationConfig`` as shipped (compensated codes, row gains, loss-weighted Hessians). Its
  one-time backward walk for the token saliencies is added, spread over the model's blocks.

SmolLM2-135M, 16 x 256 tokens of the plays, group 64, full-precision inputs of each block timed:

    python bench/calibration_time.py --blocks 0 10 20 --out bench/results/calibration_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout, or another checkout's mobiquant installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mobiquant.arch import architecture_of  # noqa: E402
from mobiquant.calibration import CalibrationConfig, calibrate_block  # noqa: E402
from mobiquant.calibration.capture import capture_block_inputs  # noqa: E402
from mobiquant.calibration.saliency import read_token_saliency  # noqa: E402
from mobiquant.calibration.store import KWARGS_FILE, fp_input_path, load_block_kwargs, load_hidden  # noqa: E402
from mobiquant.data import calibration_samples  # noqa: E402
from mobiquant.model_files import InMemoryModel  # noqa: E402
from mobiquant.sources import materialize, smollm2_gguf_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    source_files = materialize(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(source_files.path)
    model = AutoModelForCausalLM.from_pretrained(source_files.path, dtype=torch.float32).eval()
    arch = architecture_of(model.config)
    arch.linearize(model)
    samples = calibration_samples(tokenizer, "shakespeare:train", args.samples, args.seqlen, 0)
    source = InMemoryModel(model)
    configs = {
        "before compensation": CalibrationConfig(group_size=args.group_size, error_compensation=False,
                                                 loss_weighted_hessians=False),
        "default": CalibrationConfig(group_size=args.group_size),
    }
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as work:
        capture_dir = Path(work) / "capture"
        manifest = capture_block_inputs(source, samples, capture_dir, device=torch.device("cpu"),
                                        model_key=source.fingerprint(), store_dtype=torch.float32)
        all_kwargs = load_block_kwargs(capture_dir / KWARGS_FILE)
        for turn, index in enumerate(args.blocks):
            inputs = load_hidden(fp_input_path(capture_dir, index))
            # Alternate which configuration runs first, so a machine that warms up or slows down favours neither.
            order = list(configs) if turn % 2 == 0 else list(reversed(configs))
            for name in order:
                config = configs[name]
                weights, positions = (read_token_saliency(capture_dir, index) if config.loss_weighted_hessians
                                      else (None, None))
                started = time.perf_counter()
                calibrate_block(source.block(index, torch.device("cpu")), inputs, all_kwargs.for_block(index), arch,
                                config, block_index=index, progress=False, token_weights=weights,
                                token_positions=positions)
                seconds[name].append(time.perf_counter() - started)
                print(f"block {index}, {name}: {seconds[name][-1]:.1f} s", flush=True)
    saliency_per_block = manifest["saliency_seconds"] / source.num_blocks
    before = statistics.mean(seconds["before compensation"]) / 60
    default = (statistics.mean(seconds["default"]) + saliency_per_block) / 60
    report = {"blocks": args.blocks, "samples": args.samples, "seqlen": args.seqlen, "group_size": args.group_size,
              "threads": torch.get_num_threads(), "seconds": seconds,
              "saliency_seconds": manifest["saliency_seconds"], "minutes_per_block": {
                  "before compensation": before, "default (with the saliency walk's share)": default},
              "ratio": default / before}
    print("\n| calibration | minutes per block |\n|---|---|")
    print(f"| before compensation | {before:.3f} |")
    print(f"| default, with the saliency walk's share ({saliency_per_block:.2f} s per block) | {default:.3f} |")
    print(f"\ndefault / before compensation: {default / before:.2f} (issue 16's bound: 1.5)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
