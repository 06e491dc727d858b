"""Where the error-compensated codes go in a block's calibration, measured on SmolLM2 blocks.

For a few blocks (full-precision inputs from the Shakespeare calibration samples), each variant calibrates
the block without routers and reports the block's output error at 1, 2, 3 and 4 slices (mean squared error
against the full-precision block, on the calibration inputs), as a ratio to today's floor codes:

    python bench/compensation_order.py --blocks 0 10 20

Every variant uses GPTQ's Hessians ``X^T X`` (tokens weighed alike): the default's loss-weighted Hessians need
the capture's saliency walk over the whole model, which this per-block study does not run.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout, or another checkout's mobiquant installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mobiquant.arch import architecture_of  # noqa: E402
from mobiquant.calibration import CalibrationConfig, calibrate_block, quantized_block  # noqa: E402
from mobiquant.calibration.capture import block_outputs  # noqa: E402
from mobiquant.data import calibration_samples  # noqa: E402
from mobiquant.precision import mobi_layers  # noqa: E402
from mobiquant.sources import materialize, smollm2_gguf_path  # noqa: E402
from mobiquant.streaming import first_block_inputs  # noqa: E402

VARIANTS = {
    "clip search -> LWC, floor codes": {"error_compensation": False},
    "clip search -> LWC -> GPTQ 4/24/32/2": {"precision_weights": (4.0, 24.0, 32.0, 2.0)},
    "clip search -> GPTQ 4/24/32/2 (no LWC)": {"precision_weights": (4.0, 24.0, 32.0, 2.0), "epochs_stage1": 0},
    "clip search -> LWC -> GPTQ 1/24/32/2": {"precision_weights": (1.0, 24.0, 32.0, 2.0)},
    "clip search -> LWC -> GPTQ 16/24/32/2": {"precision_weights": (16.0, 24.0, 32.0, 2.0)},
    "clip search -> LWC -> GPTQ 4/24/32/32": {"precision_weights": (4.0, 24.0, 32.0, 32.0)},
    "clip search -> LWC -> GPTQ 4/24/128/128": {"precision_weights": (4.0, 24.0, 128.0, 128.0)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    source = materialize(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    arch = architecture_of(model.config)
    arch.linearize(model)
    samples = calibration_samples(tokenizer, "shakespeare:train", args.samples, args.seqlen, 0)
    hidden, all_kwargs = first_block_inputs(model, arch, samples)
    blocks = arch.block_list(model)
    variants = {name: VARIANTS[name] for name in dict.fromkeys(["clip search -> LWC, floor codes", *args.variants])}
    errors: dict[str, list[list[float]]] = {name: [] for name in variants}
    for index in range(max(args.blocks) + 1):
        block = blocks[index]
        block_kwargs = all_kwargs.for_block(index)
        targets = block_outputs(block, hidden, block_kwargs, 4, torch.float32)
        if index in args.blocks:
            for name, options in variants.items():
                config = CalibrationConfig(group_size=args.group_size, router_hidden=0, epochs_stage2=0,
                                           **{"epochs_stage1": 1, **options})
                result = calibrate_block(block, hidden, block_kwargs, arch, config, block_index=index, progress=False)
                quantized = quantized_block(copy.deepcopy(block), arch, result.state, config)
                row = []
                for k in (1, 2, 3, 4):
                    for layer in mobi_layers(quantized):
                        layer.uniform_slices = k
                    out = block_outputs(quantized, hidden, block_kwargs, 4, torch.float32)
                    row.append(float((out - targets).pow(2).mean()))
                errors[name].append(row)
                print(f"block {index} {name}: {row} ({result.seconds:.1f} s)", flush=True)
        hidden = targets
    floor = torch.tensor(errors["clip search -> LWC, floor codes"])
    print("\nBlock output MSE over the floor codes' (mean over blocks):")
    print("\n| variant | 1 slice | 2 slices | 3 slices | 4 slices |")
    print("|---|---|---|---|---|")
    for name, rows in errors.items():
        ratio = (torch.tensor(rows) / floor).mean(0).tolist()
        print(f"| {name} | " + " | ".join(f"{r:.3f}" for r in ratio) + " |")


if __name__ == "__main__":
    main()
