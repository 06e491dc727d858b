"""Speed-up of layer-parallel calibration with 2 workers over 1, as a ratio measured in one run.

    python bench/parallel.py [--runner thread|process|dask] [--layers 4] [--hidden 384] [--epochs 8]

Builds a random Llama offline, captures its block inputs once, then calibrates every block through the
``calibrate-blocks`` subflow twice (1 worker, then 2; fresh result folders so nothing is reused) on
Prefect's ephemeral server, and prints both wall times and their ratio. Each worker gets one torch
thread, so the ratio measures the task runner, not intra-op threading.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # flows/, tasks/ and registry/ run from the checkout

from flows.compress import calibrate_blocks, params_config, task_runner_for  # noqa: E402
from flows.params import CompressParams  # noqa: E402
from tasks import stages  # noqa: E402
from tests.pipeline.tiny import build_tiny_llama  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", choices=["thread", "process", "dask"], default="thread")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mobiquant-bench-") as tmp:
        work = Path(tmp)
        model = build_tiny_llama(work / "model" / "bench-llama", layers=args.layers, hidden=args.hidden)
        corpus = str(model.parent / "train.txt")
        base = CompressParams(
            model=str(model),
            calibration_data=corpus,
            samples=args.samples,
            seqlen=64,
            group_size=64,
            epochs_stage1=args.epochs,
            epochs_stage2=args.epochs,
            runner=args.runner,
            device="cpu",
        )
        captured = stages.capture(
            model, work / "capture", calibration_data=corpus, samples=args.samples, seqlen=64, seed=0,
            config=params_config(base), device="cpu",
            source_model={"source": str(model), "kind": "local", "sha": "bench"},
        )
        times = {}
        # The first run also pays one-time costs (the ephemeral Prefect server, imports, allocator warm-up):
        # an untimed pass first, so that the two timed runs compare the task runner alone.
        for run, workers in (("warm-up", 1), ("one", 1), ("two", 2)):
            params = base.model_copy(update={"workers": workers})
            start = time.perf_counter()
            calibrate_blocks.with_options(task_runner=task_runner_for(params))(
                str(model),
                captured["capture_dir"],
                captured["num_blocks"],
                params,
                str(work / f"blocks-{run}"),
            )
            times[run] = time.perf_counter() - start
    print("| runner | blocks | 1 worker s | 2 workers s | speed-up |")
    print("|---|---|---|---|---|")
    one, two = times["one"], times["two"]
    print(f"| {args.runner} | {args.layers} | {one:.2f} | {two:.2f} | {one / two:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
