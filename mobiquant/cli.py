"""The ``mobiquant`` command: quantize a model into one elastic checkpoint, evaluate it, re-fit its budget
thresholds for the text it serves, describe it.

Library errors (``ValueError`` and its subclasses, ``OSError`` such as a missing path or an unreachable
hub) end the command with one line on stderr and exit status 1; usage errors exit with status 2.
Set ``MOBIQUANT_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NoReturn

from mobiquant import __version__

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Group sizes tried, largest first, when --group-size is not given: the paper's 128 where the model's
# sizes allow it, else the largest that divides every quantized input size (64 on SmolLM2).
AUTO_GROUP_SIZES = (128, 64, 32)
# mobiquant.slicing.MAX_SLICES (a test keeps them equal).
MAX_SLICES = 8
# What mobiquant.devices.resolve_device accepts, for every command's --device.
DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"


class CommandError(ValueError):
    """A command that cannot run as asked (bad paths, conflicting options)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _path(text: str) -> str:
    # An empty path is the current folder to pathlib: an unset shell variable must not make it the output.
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return text


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _name_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def _epochs(text: str) -> tuple[int, int]:
    """``S1,S2`` (stage 1 and stage 2 epochs) or one number for both."""
    values = _int_list(text)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected STAGE1,STAGE2 epochs (non-negative), got {text!r}")
    return values[0], values[1]


def slice_weights_arg(text: str) -> dict[int, float]:
    """``K:W,K:W,...``: the weight of the output error at K slices in the compensated codes' objective."""
    weights = {}
    for item in text.split(","):
        count, _, weight = item.partition(":")
        try:
            slices, value = int(count), float(weight)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected SLICES:WEIGHT pairs like 1:4,2:1,3:1, got {text!r}") from err
        if slices in weights:
            raise argparse.ArgumentTypeError(f"{slices} slices weighted twice in {text!r}")
        weights[slices] = value
    return weights


def linear_weights_arg(text: str) -> tuple[str, dict[int, float]]:
    """``LINEAR=K:W,...``: one linear's weights (``v_proj=1:32,2:24,3:32,4:32``)."""
    name, sep, weights = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected LINEAR=SLICES:WEIGHT,... like v_proj=1:32,2:24, got {text!r}")
    return name.strip(), slice_weights_arg(weights)


def _integer_at_least(minimum: int, wording: str) -> Callable[[str], int]:
    """An argparse type for integers >= ``minimum``; ``wording`` names them in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from err
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {value}")
        return value

    return parse


_positive_int = _integer_at_least(1, "a positive integer")
_whole_number = _integer_at_least(0, "a whole number >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from err
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _slice_count(text: str) -> int:
    # Bounds from mobiquant.slicing, inlined so that parsing arguments imports no torch.
    value = _positive_int(text)
    if value > MAX_SLICES:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_SLICES} slices ({2 * MAX_SLICES}-bit codes; a 16-bit weight holds no more), got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mobiquant", description="MoBiQuant: one elastic any-precision checkpoint per LLM.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    quantize = commands.add_parser("quantize", help="calibrate a model and write one elastic checkpoint")
    quantize.add_argument("model", metavar="MODEL", help="local model folder, hub id, or GGUF file")
    quantize.add_argument(
        "-o", "--output", type=_path, required=True, metavar="DIR", help="checkpoint directory to write"
    )
    quantize.add_argument("--revision", help="hub revision (branch, tag or commit) of MODEL")
    quantize.add_argument("--data", default="shakespeare:train", help="calibration text (default: %(default)s)")
    quantize.add_argument("--samples", type=_positive_int, default=16, help="calibration sequences (default: 16)")
    quantize.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per sequence (default: 256)")
    quantize.add_argument(
        "--epochs", type=_epochs, metavar="S1,S2", help="epochs of stage 1 and stage 2 (default: 1,1)"
    )
    quantize.add_argument(
        "--mode", choices=("parallel", "sequential"),
        help="block inputs: the full-precision model's (parallel, the default: blocks calibrate independently) or "
        "the quantized blocks' outputs (sequential, as GPTQ: one block after another)",
    )
    quantize.add_argument(
        "--group-size", type=_positive_int, help="input columns per scale (default: 128, or 64/32 where 128 won't fit)"
    )
    quantize.add_argument(
        "--slices", type=_slice_count, help=f"2-bit slices K, 1..{MAX_SLICES} (default: 4, i.e. up to 8 bits)"
    )
    quantize.add_argument(
        "--router-hidden", type=int, help="router hidden width (default: 32; 0: no router, uniform only)"
    )
    quantize.add_argument(
        "--precision-weights", type=slice_weights_arg, metavar="K:W,...",
        help="weights of the output error at K slices that the error-compensated codes minimise, e.g. 1:4,2:1,3:1 "
        "to favour 2 bits (default: 1:2,2:24,3:32,4:8; v_proj 1:32,2:24,3:32,4:8)",
    )
    quantize.add_argument(
        "--module-precision-weights", type=linear_weights_arg, action="append", metavar="LINEAR=K:W,...",
        help="--precision-weights for one linear of every block, named as in the block or by its last part, "
        "e.g. v_proj=1:32,2:24,3:32,4:32 (repeatable)",
    )
    quantize.add_argument(
        "--clip-weights", type=slice_weights_arg, metavar="K:W,...",
        help="weights of the output error at K slices in the clip search that sets every group's range, e.g. "
        "1:1,2:24,3:32 to keep more of 2 bits (default: 1:1,2:24,3:32,4:32, every linear)",
    )
    quantize.add_argument(
        "--module-clip-weights", type=linear_weights_arg, action="append", metavar="LINEAR=K:W,...",
        help="--clip-weights for one linear of every block, e.g. v_proj=1:1,2:1,3:1 (repeatable)",
    )
    quantize.add_argument(
        "--damp", type=_positive_float, metavar="D",
        help="GPTQ dampening of the error-compensated codes, as a fraction of the Hessian's mean diagonal "
        "(default: 0.1)",
    )
    quantize.add_argument(
        "--descent-sweeps", type=_whole_number, metavar="N",
        help="sweeps of coordinate descent over the codes after GPTQ's pass, on the same objective "
        "(default: 0, GPTQ's codes)",
    )
    quantize.add_argument(
        "--end-to-end-steps", type=_whole_number, metavar="N",
        help="after the blocks, N steps tuning every group's scale and zero and the row gains through the whole "
        "model towards the source model's next-token distribution, codes unchanged (a few minutes per 16 steps "
        "on a 135M model on CPU; default: 0, off)",
    )
    quantize.add_argument(
        "--end-to-end-lr", type=_positive_float, metavar="LR",
        help="peak learning rate of --end-to-end-steps (Adam, cosine decay; default: 5e-4)",
    )
    quantize.add_argument(
        "--end-to-end-dtype", choices=("float32", "bfloat16"),
        help="precision of --end-to-end-steps' matrix products: bfloat16 (autocast) is faster on GPUs and on CPUs "
        "with bf16 units (default: float32)",
    )
    quantize.add_argument(
        "--end-to-end-schedule", choices=("all", "rotate"),
        help="slice counts each step of --end-to-end-steps runs: all weighted ones, or one in turn in the weights' "
        "proportions (rotate: a pass per step, not one per count; default: all)",
    )
    quantize.add_argument(
        "--end-to-end-weights", type=slice_weights_arg, metavar="K:W,...",
        help="weights of the KL at K slices in --end-to-end-steps' loss (default: 2:1,3:1,4:0.5)",
    )
    quantize.add_argument(
        "--uniform-hessians", action="store_true",
        help="weigh every calibration token alike in the Hessians (GPTQ's X^T X) instead of by its loss "
        "saliency, the squared loss gradient at each linear's outputs (default: loss-weighted)",
    )
    quantize.add_argument("--seed", type=int, default=0, help="seed for samples and training (default: 0)")
    quantize.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    quantize.add_argument(
        "--threads", type=_positive_int,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores this process may use)",
    )
    quantize.add_argument(
        "--compute-dtype", choices=("float32", "tfloat32", "bfloat16"), default="float32",
        help="block matrix products on CUDA: float32 (default), tfloat32 or bfloat16 autocast",
    )
    quantize.add_argument(
        "--float32-inputs", action="store_true",
        help="keep captured block inputs in float32 (default: the source model's dtype, e.g. bfloat16)",
    )
    quantize.add_argument("--work-dir", help="resumable work folder (default: .DIR.mobiquant-work beside DIR)")
    quantize.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    quantize.add_argument(
        "--force", action="store_true",
        help="replace DIR if it holds an earlier MoBiQuant checkpoint (a folder of other files is never replaced)",
    )
    quantize.add_argument(
        "--allow-pickle",
        action="store_true",
        help="RISK: also accept pickle weights (.bin/.pt); unpickling runs any code the file holds, so use it "
        "only for a source you trust (default: safetensors only)",
    )
    quantize.set_defaults(handler=cmd_quantize)

    evaluate = commands.add_parser(
        "eval", help="perplexity (or lm-eval benchmark tasks) and measured average bits per precision setting"
    )
    evaluate.add_argument("checkpoint", metavar="DIR", help="MoBiQuant checkpoint directory")
    evaluate.add_argument(
        "--data", default="shakespeare:test", help="evaluation text for perplexity (default: %(default)s)"
    )
    evaluate.add_argument(
        "--avg-bits", type=_float_list, default=[], metavar="B,...",
        help="routed average bits (with neither --avg-bits nor --uniform: every uniform slice count)",
    )
    evaluate.add_argument("--uniform", type=_int_list, default=[], metavar="K,...", help="uniform slice counts")
    evaluate.add_argument(
        "--seqlen", type=_positive_int, default=2048,
        help="window length (default: 2048, or the model's context where shorter)",
    )
    evaluate.add_argument("--max-windows", type=_positive_int, help="evaluate only the first N windows (default: all)")
    evaluate.add_argument("--max-slices", type=_positive_int, help="load only the first M slices (default: all)")
    evaluate.add_argument("--device", help=f"{DEVICE_HELP} (default: auto)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument(
        "--hold-budget", action="store_true",
        help="routed budgets: keep the measured bits at the budget on this text by feedback (hold_budget) instead "
        "of reading the thresholds fitted on the calibration text as they are",
    )
    evaluate.add_argument(
        "--tasks", type=_name_list, metavar="T,...", help="lm-eval-harness tasks to run instead of perplexity"
    )
    evaluate.add_argument("--include-path", metavar="DIR", help="also read lm-eval task YAMLs from DIR")
    evaluate.add_argument("--limit", type=_positive_int, help="run only the first N documents of each task")
    evaluate.add_argument(
        "--batch-size", type=_positive_int, default=1,
        help="lm-eval batch size (default: 1); avg bits counts only the requests' own tokens, not the padding of a "
        "batch",
    )
    evaluate.set_defaults(handler=cmd_eval)

    thresholds = commands.add_parser(
        "thresholds", help="re-fit a routed checkpoint's budget thresholds on text like the text it will serve"
    )
    thresholds.add_argument("checkpoint", metavar="DIR", help="MoBiQuant checkpoint directory, with routers")
    thresholds.add_argument("--data", required=True, help="text of the serving domain: a file, a folder or a dataset")
    thresholds.add_argument("--samples", type=_positive_int, default=16, help="sequences (default: 16)")
    thresholds.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per sequence (default: 256)")
    thresholds.add_argument("--seed", type=int, default=0, help="seed for the sequences drawn (default: 0)")
    thresholds.add_argument(
        "-o", "--output", type=_path, metavar="OUT",
        help="write the re-fitted checkpoint to OUT (default: replace DIR, atomically)",
    )
    thresholds.add_argument("--force", action="store_true", help="replace OUT if it already holds a checkpoint")
    thresholds.add_argument("--device", help=f"{DEVICE_HELP} (default: auto)")
    thresholds.set_defaults(handler=cmd_thresholds)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint", metavar="DIR", help="MoBiQuant checkpoint directory")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, OSError) as err:
        if os.environ.get("MOBIQUANT_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mobiquant {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # quantize keeps its work folder on interruption: finished blocks are not redone on the next run.
        hint = ": run the same command again to resume" if args.command == "quantize" else ""
        # On a line of its own: a progress bar may have been drawn without its newline.
        print(f"\nmobiquant {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


# ---------------------------------------------------------------------------------------------------
# quantize


def auto_group_size(block: Any, arch: Any) -> int:
    """The largest of ``AUTO_GROUP_SIZES`` that divides the input size of every quantized linear of ``block``."""
    sizes = {linear.in_features for linear in arch.quantized_linears(block).values()}
    for candidate in AUTO_GROUP_SIZES:
        if all(size % candidate == 0 for size in sizes):
            return candidate
    raise CommandError(f"no group size in {AUTO_GROUP_SIZES} divides the input sizes {sorted(sizes)}")


def calibration_options(args: argparse.Namespace, group_size: int) -> dict[str, Any]:
    """``CalibrationConfig`` keyword arguments from ``mobiquant quantize``'s options."""
    from mobiquant.calibration.config import linear_weight_tuples, precision_weight_tuple

    options: dict[str, Any] = {"group_size": group_size, "seed": args.seed, "compute_dtype": args.compute_dtype}
    if args.slices is not None:
        options["num_slices"] = args.slices
    if args.router_hidden is not None:
        options["router_hidden"] = args.router_hidden
    if args.mode is not None:
        options["mode"] = args.mode
    if args.epochs is not None:
        options["epochs_stage1"], options["epochs_stage2"] = args.epochs
    if args.damp is not None:
        options["damp"] = args.damp
    if args.descent_sweeps is not None:
        options["descent_sweeps"] = args.descent_sweeps
    if args.end_to_end_steps is not None:
        options["end_to_end_steps"] = args.end_to_end_steps
    if args.end_to_end_lr is not None:
        options["end_to_end_lr"] = args.end_to_end_lr
    if args.end_to_end_dtype is not None:
        options["end_to_end_dtype"] = args.end_to_end_dtype
    if args.end_to_end_schedule is not None:
        options["end_to_end_schedule"] = args.end_to_end_schedule
    if args.uniform_hessians:
        options["loss_weighted_hessians"] = False
    num_slices = options.get("num_slices", 4)
    if args.precision_weights is not None:
        options["precision_weights"] = precision_weight_tuple(args.precision_weights, num_slices)
    if args.clip_weights is not None:
        options["clip_search_weights"] = precision_weight_tuple(args.clip_weights, num_slices)
    if args.end_to_end_weights is not None:
        options["end_to_end_weights"] = precision_weight_tuple(args.end_to_end_weights, num_slices)
    for option, given in (("module_precision_weights", args.module_precision_weights),
                          ("module_clip_search_weights", args.module_clip_weights)):
        options[option] = linear_weight_tuples(dict(given or ()), num_slices)
    return options


def cmd_quantize(args: argparse.Namespace) -> None:
    from mobiquant.data import cache_root
    from mobiquant.devices import set_threads
    from mobiquant.outputs import check_output_dir, check_work_dir

    output = Path(args.output).expanduser().absolute()
    work_root = Path(args.work_dir) if args.work_dir else output.parent / f".{output.name}.mobiquant-work"
    model_path = Path(args.model).expanduser()
    local_source = [("source model", model_path)] if model_path.exists() else []
    protected = [("work folder", work_root), ("mobiquant cache", cache_root()), *local_source]
    # Checked before anything slow runs: a calibration must not end in a refused write or a deleted source.
    check_output_dir(output, args.force, protected)
    check_work_dir(work_root, output, local_source)
    device = _device(args.device)
    if args.compute_dtype != "float32" and device.type != "cuda":
        raise CommandError(f"--compute-dtype {args.compute_dtype} needs a CUDA device; {device} computes in float32")
    threads = set_threads(args.threads)

    import torch

    from mobiquant.calibration import CalibrationConfig, quantize_files
    from mobiquant.calibration.driver import remove_work_folder
    from mobiquant.checkpoint import save_checkpoint
    from mobiquant.data import calibration_samples
    from mobiquant.model_files import ModelFiles
    from mobiquant.sources import check_tokenizer, load_tokenizer, materialize, with_safetensors

    source = materialize(args.model, revision=args.revision, allow_pickle=args.allow_pickle)
    check_output_dir(output, args.force, [*protected, ("source model", source.path)])
    check_work_dir(work_root, output, [("source model", source.path)])
    source = with_safetensors(source)
    files = ModelFiles(source.path)
    files.check()
    tokenizer = load_tokenizer(source.path)
    check_tokenizer(tokenizer, files.config)
    group_size = args.group_size or auto_group_size(files.block_structure(0), files.arch)
    config = CalibrationConfig(**calibration_options(args, group_size))
    print(
        f"mobiquant: {source.source} ({source.kind} {source.sha[:12]}), group size {group_size}, "
        f"{args.samples} x {args.seqlen} tokens of {args.data}, on {device} ({threads} CPU threads)",
        file=sys.stderr,
    )
    samples = calibration_samples(tokenizer, args.data, args.samples, args.seqlen, args.seed)
    provenance = {
        "calibration_data": {"source": args.data, "samples": args.samples, "seqlen": args.seqlen},
        "source_model": {"source": source.source, "kind": source.kind, "sha": source.sha},
    }
    # The calibration resumes from blocks keyed by the source's content sha, samples and settings; one folder
    # per source model keeps the work of different models apart.
    run_work = work_root / source.sha[:16]
    model = quantize_files(
        source.path, samples, config, run_work, model_key=source.sha, device=device,
        provenance=provenance, store_dtype=torch.float32 if args.float32_inputs else None,
    )
    # save_checkpoint writes beside the output and renames into place: no half checkpoint after a failure.
    save_checkpoint(model, output, tokenizer, overwrite=args.force)
    if not args.keep_work:
        # Only this run's folder: a --work-dir the user named may hold other models' work or their own files.
        # Not while a calibration started on it since this one finished holds it: that run keeps its work.
        remove_work_folder(run_work)
        if work_root.is_dir() and not any(work_root.iterdir()):
            work_root.rmdir()
    print(f"mobiquant: wrote {output}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# eval and info


def _checkpoint_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a checkpoint directory")
    return path


def precision_settings(uniform: Sequence[int], avg_bits: Sequence[float]) -> list[tuple[str, float, dict[str, Any]]]:
    """``(mode, target, set_precision arguments)`` for each uniform slice count, then each routed budget."""
    settings: list[tuple[str, float, dict[str, Any]]] = [("uniform", k, {"slices": k}) for k in uniform]
    return settings + [("routed", b, {"avg_bits": b}) for b in avg_bits]


def _setting_name(row: dict[str, Any]) -> str:
    if row["mode"] == "uniform":
        return f"uniform {row['target']} slice{'s' if row['target'] > 1 else ''}"
    return f"routed {row['target']:g} bits{' held' if row.get('budget_held') else ''}"


def evaluate_settings(
    model: Any,
    tokens: Any,
    uniform: Sequence[int],
    avg_bits: Sequence[float],
    seqlen: int,
    max_windows: int | None,
    progress: bool = True,
    hold: bool = False,
) -> list[dict[str, Any]]:
    """Perplexity and measured average bits for each uniform slice count, then each routed budget (held on
    the text by ``hold_budget`` with ``hold``, from the budget's tables as they are)."""
    from mobiquant.evaluation import perplexity
    from mobiquant.precision import hold_budget, set_precision, track_bits

    rows = []
    for mode, target, kwargs in precision_settings(uniform, avg_bits):
        set_precision(model, **kwargs)
        held = hold and mode == "routed"
        with hold_budget(model, target) if held else nullcontext(), track_bits(model) as meter:
            desc = f"perplexity, {target} slices" if mode == "uniform" else f"perplexity, routed {target:g} bits"
            ppl = perplexity(model, tokens, seqlen=seqlen, max_windows=max_windows, progress=progress, desc=desc)
        rows.append({"mode": mode, "target": target, "avg_bits": meter.avg_bits, "perplexity": ppl,
                     "budget_held": held})
    return rows


def eval_settings(quant: dict[str, Any], args: argparse.Namespace) -> tuple[list[int], list[float]]:
    """The uniform slice counts and routed budgets to evaluate, checked against the checkpoint's config."""
    num_slices = int(quant["num_slices"])
    if args.max_slices is not None and args.max_slices > num_slices:
        raise CommandError(f"--max-slices {args.max_slices}: the checkpoint has {num_slices} slices")
    held = args.max_slices or num_slices
    uniform, avg_bits = list(args.uniform), list(args.avg_bits)
    if not uniform and not avg_bits:
        uniform = list(range(1, held + 1))
    outside_slices = [k for k in uniform if not 1 <= k <= held]
    if outside_slices:
        raise CommandError(f"--uniform {outside_slices[0]}: slice counts must be in 1..{held} for this checkpoint")
    top = 2.0 * held
    outside = [b for b in avg_bits if not 2.0 <= b <= top]
    if outside:
        slices = f"the {held} slices loaded" if held < num_slices else "this checkpoint"
        raise CommandError(f"--avg-bits {outside[0]:g}: average bits must be in [2, {top:g}] for {slices}")
    if avg_bits and not quant.get("router_hidden"):
        raise CommandError("this checkpoint has no routers: evaluate it with --uniform only")
    return uniform, avg_bits


def _device(name: str | None) -> Any:
    """The torch device ``--device`` names (default: the first GPU if there is one, else the CPU)."""
    from mobiquant.devices import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as error:
        raise CommandError(f"--device {name}: {error.reason}") from error


def cmd_eval(args: argparse.Namespace) -> None:
    from mobiquant.checkpoint import load_checkpoint, read_quantization_config
    from mobiquant.data import evaluation_tokens
    from mobiquant.evaluation import model_context
    from mobiquant.sources import load_tokenizer

    path = _checkpoint_dir(args.checkpoint)
    # Settings, data and task names are checked before the model is loaded, so a typo fails in seconds.
    uniform, avg_bits = eval_settings(read_quantization_config(path), args)
    if args.hold_budget and args.tasks:
        raise CommandError("--hold-budget applies to perplexity: lm-eval tasks run each budget as fitted")
    tokenizer = load_tokenizer(path)
    if args.tasks:
        from mobiquant.harness import check_tasks, task_manager

        manager = task_manager(args.include_path)
        check_tasks(manager, args.tasks)
    else:
        tokens = evaluation_tokens(tokenizer, args.data)
    model = load_checkpoint(path, max_slices=args.max_slices, device=_device(args.device)).eval()
    if args.tasks:
        _eval_tasks(args, path, model, tokenizer, manager, precision_settings(uniform, avg_bits))
        return
    seqlen = min(args.seqlen, model_context(model) or args.seqlen)
    windows = tokens.shape[1] // seqlen
    if args.max_windows is not None:
        windows = min(windows, args.max_windows)
    rows = evaluate_settings(model, tokens, uniform, avg_bits, seqlen, args.max_windows, progress=not args.json,
                             hold=args.hold_budget)
    if args.json:
        report = {"checkpoint": str(path), "data": args.data, "seqlen": seqlen, "windows": windows, "results": rows}
        print(json.dumps(report, indent=2))
        return
    print(f"{path} on {args.data}: {windows} windows of {seqlen} tokens")
    print(f"{'setting':<20} {'avg bits':>9} {'perplexity':>11}")
    for row in rows:
        print(f"{_setting_name(row):<20} {row['avg_bits']:>9.3f} {row['perplexity']:>11.3f}")


def _eval_tasks(
    args: argparse.Namespace,
    path: Path,
    model: Any,
    tokenizer: Any,
    manager: Any,
    settings: list[tuple[str, float, dict[str, Any]]],
) -> None:
    """lm-eval tasks at every setting, as one table (or JSON): a row per setting, a column per task metric."""
    from mobiquant.harness import evaluate_tasks

    rows = evaluate_tasks(model, tokenizer, manager, args.tasks, settings, limit=args.limit, batch_size=args.batch_size)
    if args.json:
        report = {"checkpoint": str(path), "tasks": args.tasks, "limit": args.limit, "results": rows}
        print(json.dumps(report, indent=2))
        return
    columns = list(dict.fromkeys(label for row in rows for label in row["tasks"]))
    widths = [max(len(label), 8) for label in columns]
    limit = f", first {args.limit} documents of each task" if args.limit else ""
    print(f"{path}: lm-eval {', '.join(args.tasks)}{limit}")
    header = [f"{column:>{width}}" for column, width in zip(columns, widths, strict=True)]
    print(" ".join([f"{'setting':<20}", f"{'avg bits':>9}", *header]))
    for row in rows:
        scores = [row["tasks"].get(column, math.nan) for column in columns]
        values = [f"{score:>{width}.4f}" for score, width in zip(scores, widths, strict=True)]
        print(" ".join([f"{_setting_name(row):<20}", f"{row['avg_bits']:>9.3f}", *values]))


def cmd_thresholds(args: argparse.Namespace) -> None:
    """Re-fit the thresholds of every routed layer on ``--data``; codes, group parameters and routers stay as they are.

    The thresholds are quantiles of router scores on the text they were fitted on; on text of another domain the
    scores shift and a budget spends other bits than asked (docs/quality.md). One pass over a sample of the serving
    text, with no recalibration, gives budgets that hold there.
    """
    from mobiquant.checkpoint import load_checkpoint, read_quantization_config, save_checkpoint
    from mobiquant.data import calibration_samples
    from mobiquant.outputs import check_output_dir
    from mobiquant.precision import calibrate_thresholds
    from mobiquant.sources import load_tokenizer

    path = _checkpoint_dir(args.checkpoint)
    if not read_quantization_config(path).get("router_hidden"):
        raise CommandError(f"{path} has no routers: it runs at uniform precision only and has no thresholds to fit")
    if args.output is None:
        # Replaced in place, atomically: checked writable before the passes run, not after.
        output = check_output_dir(path, force=True)
    else:
        output = check_output_dir(args.output, args.force, [("checkpoint it reads", path)])
    # As quantize refuses its calibration windows: past its positions a model's scores, and the thresholds fitted
    # on them, are not those it serves.
    positions = json.loads((path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    if isinstance(positions, int) and args.seqlen > positions:
        raise CommandError(f"--seqlen {args.seqlen} is longer than the model's {positions} positions "
                           "(max_position_embeddings): use a shorter seqlen")
    tokenizer = load_tokenizer(path)
    # Drawn before the model loads: too little text fails in seconds, and the checkpoint is untouched.
    samples = calibration_samples(tokenizer, args.data, args.samples, args.seqlen, args.seed)
    model = load_checkpoint(path, device=_device(args.device)).eval()
    print(f"mobiquant: fitting thresholds on {args.samples} x {args.seqlen} tokens of {args.data}", file=sys.stderr)
    calibrate_thresholds(model, samples, progress=True)
    fitted_on = {"source": args.data, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed}
    save_checkpoint(model, output, tokenizer, extra_config={"threshold_data": fitted_on}, overwrite=True)
    print(f"mobiquant: wrote {output}", file=sys.stderr)


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """What ``mobiquant info`` reports: configuration, slices, group size, storage and layers.

    The model is laid out on the meta device and the files' headers are checked against it: only the small threshold
    tables are read, so a 70B checkpoint's summary needs no 70B of memory.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from mobiquant.arch import architecture_of, fold_experts
    from mobiquant.checkpoint import MoBiQuantConfig, check_layer_tensors, read_quantization_config, replace_linears
    from mobiquant.layers import UNCALIBRATED, MoBiLinear

    quant = read_quantization_config(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model_config = AutoConfig.from_pretrained(path)
    arch = architecture_of(model_config)
    with torch.device("meta"):
        model = arch.linearize(AutoModelForCausalLM.from_config(model_config))
    replace_linears(model, arch, quant["num_slices"], quant["group_size"], quant["router_hidden"], quant["linears"],
                    len(quant["threshold_bits"]) or None)
    files = sorted(path.glob("*.safetensors"))
    check_layer_tensors(model, files, MoBiQuantConfig(**quant))
    shapes: dict[str, dict[str, int]] = {}
    layers: list[MoBiLinear] = []
    for block in arch.block_list(model):
        named = {name: module for name, module in block.named_modules() if isinstance(module, MoBiLinear)}
        # Experts' linears are one entry per projection (mlp.experts.<0-127>.down_proj), not one per expert.
        folded = fold_experts(named)
        for name, module in named.items():
            layers.append(module)
            key = folded[name]
            entry = shapes.setdefault(key, {"in": module.in_features, "out": module.out_features, "count": 0})
            entry["count"] += 1
    if not layers:
        raise CommandError(f"{path} holds no MoBiQuant layers")
    quantized = sum(layer.in_features * layer.out_features for layer in layers)
    code_bytes = sum(layer.planes.numel() * layer.planes.element_size() for layer in layers)
    group_bytes = sum(t.numel() * t.element_size() for layer in layers for t in (layer.scale, layer.zero))
    gain_bytes = sum(layer.gains.numel() * layer.gains.element_size() for layer in layers)
    routed = [layer for layer in layers if layer.router is not None]
    threshold_minima = []
    for file in files:
        with safe_open(os.fspath(file), framework="pt") as handle:
            names = handle.keys()  # safe_open has no __iter__
            threshold_minima += [float(handle.get_tensor(key).min()) for key in names if key.endswith(".thresholds")]
    return {
        "checkpoint": str(path),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures") or [],
        "blocks": len(arch.block_list(model)),
        "num_slices": quant["num_slices"],
        "group_size": quant["group_size"],
        "router_hidden": quant.get("router_hidden"),
        "thresholds_calibrated": bool(routed) and bool(threshold_minima)
        and all(minimum < UNCALIBRATED for minimum in threshold_minima),
        "quantized_layers": len(layers),
        "quantized_weights": quantized,
        "other_parameters": sum(p.numel() for p in model.parameters()),
        "bytes_per_weight": (code_bytes + group_bytes + gain_bytes) / quantized,
        "code_bits_per_weight": 8 * code_bytes / quantized,
        "group_bits_per_weight": 8 * group_bytes / quantized,
        "gain_bits_per_weight": 8 * gain_bytes / quantized,
        "router_parameters": sum(p.numel() for layer in routed for p in layer.router.parameters()),
        "disk_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "layers": shapes,
        "quantization_config": {k: v for k, v in quant.items() if k != "threshold_bits"},
    }


def cmd_info(args: argparse.Namespace) -> None:
    summary = checkpoint_summary(_checkpoint_dir(args.checkpoint))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    slices = summary["num_slices"]
    bits = "/".join(str(2 * k) for k in range(1, slices + 1))
    lines = [
        ("checkpoint", summary["checkpoint"]),
        ("model", f"{summary['model_type']} ({', '.join(summary['architectures'])}), {summary['blocks']} blocks"),
        ("slices", f"{slices} ({bits} bits)"),
        ("group size", summary["group_size"]),
        ("router", f"hidden {summary['router_hidden']}, thresholds calibrated: {summary['thresholds_calibrated']}"),
        ("quantized", f"{summary['quantized_weights']:,} weights in {summary['quantized_layers']} layers"),
        (
            "bits/weight",
            f"{8 * summary['bytes_per_weight']:.3f} ({summary['code_bits_per_weight']:.2f} code + "
            f"{summary['group_bits_per_weight']:.3f} scale/zero + {summary['gain_bits_per_weight']:.3f} row gain)",
        ),
        ("routers", f"{summary['router_parameters']:,} parameters"),
        ("other", f"{summary['other_parameters']:,} parameters (embeddings, norms, unquantized layers, routers)"),
        ("on disk", f"{summary['disk_bytes'] / 2**20:.1f} MiB"),
    ]
    for key, value in lines:
        print(f"{key:<13} {value}")
    print("layers (per block)")
    for name, entry in summary["layers"].items():
        print(f"  {name:<24} {entry['in']:>6} -> {entry['out']:<6} x{entry['count']}")


if __name__ == "__main__":
    sys.exit(main())
