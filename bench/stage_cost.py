"""What the end-to-end stage adds to a calibration's time, against the blocks' own time, on one device, one run.

Issue 16 bounds the calibration time at 1.5x what it took before the compensated codes, on the same machine. The
end-to-end stage (``--end-to-end-steps``, rotating schedule) is what meets the 2-slice 0.92x target, and it is off
by default because on the CPU it costs far more than that bound leaves. This script times, on ``--device``, the
whole ``quantize_model`` of a random Llama of a release's shape (a pass costs the same whatever the weights):

* **before compensation**: ``error_compensation=False``, uniform Hessians (issue 16's starting point);
* **default**: ``CalibrationConfig`` as shipped, in a work folder that then serves the runs below;
* **resumed**: the default again in that folder (every block reused: capture check, thresholds);
* **stage S steps, DTYPE**: the default plus S rotating steps in that folder (blocks reused); minus *resumed*, it
  is the teacher, the S steps and the router refit. Two step counts give the seconds per step and the fixed part.

Printed: the seconds of each, the stage's seconds per step and fixed seconds, and for ``--project-steps`` steps
(64 met the 0.92x target) the ratio (default + stage) / before compensation, against the bound of 1.5. With fewer
blocks than the release (``--layers``) the head's share of a step is larger than in the whole model, so the ratio
errs high. The JSON is rewritten after each run, so a run cut short keeps what it measured.

    python bench/stage_cost.py --device cuda --layers 8 --out stage_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout, or another checkout's mobiquant installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mobiquant.calibration import CalibrationConfig, quantize_model  # noqa: E402
from mobiquant.calibration.config import END_TO_END_DTYPES  # noqa: E402
from mobiquant.devices import resolve_device  # noqa: E402

# Block shapes and vocabularies of the releases (hidden, MLP width, heads, KV heads, vocabulary, tied head).
SHAPES = {
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "tie_word_embeddings": True},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
}
TIME_BOUND = 1.5  # issue 16: calibration time at most 1.5x the time before the compensated codes


def random_llama(shape: str, layers: int, seqlen: int, device: torch.device) -> LlamaForCausalLM:
    """The same random Llama on every call (seed 0), in float32 on ``device``."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max(seqlen, 512), **SHAPES[shape])
    return LlamaForCausalLM(config).eval().to(device)


def seconds_of(run: Callable[[], object], device: torch.device) -> float:
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--layers", type=int, default=30, help="blocks of the random model (SmolLM2 has 30)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs=2, default=[8, 24], metavar=("S1", "S2"))
    parser.add_argument("--dtypes", nargs="+", choices=END_TO_END_DTYPES, default=["float32", "bfloat16"])
    parser.add_argument("--project-steps", type=int, default=64)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    vocab = SHAPES[args.shape]["vocab_size"]
    samples = torch.randint(0, vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    default = CalibrationConfig(group_size=args.group_size)
    before = CalibrationConfig(group_size=args.group_size, error_compensation=False, loss_weighted_hessians=False)
    report: dict[str, object] = {"shape": args.shape, "layers": args.layers, "device": str(device),
                                 "samples": [args.samples, args.seqlen], "group_size": args.group_size,
                                 "threads": torch.get_num_threads(), "seconds": {}}
    seconds: dict[str, float] = report["seconds"]  # type: ignore[assignment]

    def record(name: str, config: CalibrationConfig, work: Path) -> float:
        model = random_llama(args.shape, args.layers, args.seqlen, device)
        seconds[name] = seconds_of(lambda: quantize_model(model, samples, config, work, progress=False), device)
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        return seconds[name]

    with tempfile.TemporaryDirectory() as scratch:
        record("before compensation", before, Path(scratch) / "before")
        shared = Path(scratch) / "default"
        record("default", default, shared)
        resumed = record("resumed", default, shared)
        stage: dict[str, dict[str, float]] = {}
        for dtype in args.dtypes:
            added = []
            for steps in args.steps:
                tuned = CalibrationConfig(group_size=args.group_size, end_to_end_steps=steps,
                                          end_to_end_schedule="rotate", end_to_end_dtype=dtype)
                added.append(record(f"stage {steps} steps, {dtype}", tuned, shared) - resumed)
            per_step = (added[1] - added[0]) / (args.steps[1] - args.steps[0])
            fixed = added[0] - args.steps[0] * per_step
            projected = fixed + args.project_steps * per_step
            stage[dtype] = {"seconds_per_step": per_step, "fixed_seconds": fixed,
                            f"seconds_for_{args.project_steps}_steps": projected,
                            "ratio_to_before_compensation": (seconds["default"] + projected)
                            / seconds["before compensation"]}
        report["stage"] = stage
    report["ratio default / before compensation"] = seconds["default"] / seconds["before compensation"]
    print(f"\n{args.shape} x {args.layers} blocks on {device}, {args.samples} x {args.seqlen} tokens, "
          f"group {args.group_size}: default / before compensation {report['ratio default / before compensation']:.2f}")
    print(f"| stage dtype | s per step | fixed s (teacher, refit) | default + {args.project_steps} steps / before "
          f"compensation (bound {TIME_BOUND}) |\n|---|---|---|---|")
    for dtype, row in stage.items():
        print(f"| {dtype} | {row['seconds_per_step']:.3f} | {row['fixed_seconds']:.1f} | "
              f"{row['ratio_to_before_compensation']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
