"""The same calibration on two devices: a random SmolLM2-shaped Llama (two blocks) on CUDA and on the CPU.

Floating-point sums differ between devices, so the codes may differ where a weight sits on a rounding
boundary; this prints, as JSON, how many layers' codes agree (``layers_with_identical_planes`` of
``layers``, and the smallest fraction of equal plane words in a layer), the largest relative difference of
the scales, the largest logits difference between the two runs beside the logits' scale, and each run's
seconds.

    python bench/device_parity.py [--runs cuda@float32,cpu@float32 --blocks 2]

Both devices are checked before any work: a run naming a device this machine lacks (``cuda`` without a
GPU) stops in one line, exit status 1, nothing measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mobiquant.calibration import CalibrationConfig, quantize_files  # noqa: E402
from mobiquant.checkpoint import mobi_layers  # noqa: E402
from mobiquant.devices import DeviceError, resolve_device  # noqa: E402


def parse_runs(parser: argparse.ArgumentParser, text: str) -> list[tuple[str, torch.device, CalibrationConfig]]:
    """``DEVICE@COMPUTE_DTYPE,DEVICE@COMPUTE_DTYPE`` as (spec, device, calibration), every part checked."""
    specs = text.split(",")
    if len(specs) != 2:
        parser.error(f"--runs takes two DEVICE@COMPUTE_DTYPE runs separated by a comma, got {text!r}")
    runs = []
    for spec in specs:
        device_name, _, dtype = spec.partition("@")
        try:
            calibration = CalibrationConfig(group_size=64, epochs_stage1=1, epochs_stage2=1,
                                            compute_dtype=dtype or "float32")
        except ValueError as error:
            parser.error(f"--runs {spec!r}: {error}")
        try:
            device = resolve_device(device_name)
        except DeviceError as error:
            raise SystemExit(f"device_parity: {error}; nothing measured") from None
        if device.type != "cuda" and calibration.compute_dtype != "float32":
            parser.error(f"--runs {spec!r}: compute_dtype {calibration.compute_dtype} needs a CUDA device")
        runs.append((spec, device, calibration))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="cuda@float32,cpu@float32", help="two DEVICE@COMPUTE_DTYPE runs")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()
    specs = parse_runs(parser, args.runs)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, num_hidden_layers=args.blocks, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    for name, param in model.named_parameters():
        if name.endswith("proj.weight"):
            torch.nn.init.normal_(param, std=0.02)
    samples = torch.randint(0, config.vocab_size, (args.samples, args.seqlen))
    probe = torch.randint(0, config.vocab_size, (2, args.seqlen))
    runs = []
    with tempfile.TemporaryDirectory(prefix="mobiquant-parity-") as tmp:
        model.save_pretrained(Path(tmp) / "model")
        for index, (_spec, device, calibration) in enumerate(specs):
            start = time.perf_counter()
            quantized = quantize_files(Path(tmp) / "model", samples, calibration, Path(tmp) / f"work-{index}",
                                       model_key="parity", device=device, progress=False)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                logits = quantized(probe.to(device)).logits.float().cpu()
            state = {name: {k: v.cpu() for k, v in layer.state_dict().items()}
                     for name, layer in mobi_layers(quantized).items()}
            runs.append({"seconds": seconds, "logits": logits, "state": state, "dtype": calibration.compute_dtype})
    # A list, not a dict keyed by the spec: the same spec twice compares two runs, not one run with itself.
    first, second = runs
    planes_equal = sum(int(torch.equal(first["state"][n]["planes"], second["state"][n]["planes"]))
                       for n in first["state"])
    bits_agree = [
        float((first["state"][n]["planes"] == second["state"][n]["planes"]).float().mean()) for n in first["state"]
    ]
    scale_diff = max(float(((first["state"][n]["scale"].float() - second["state"][n]["scale"].float()).abs()
                            / second["state"][n]["scale"].float().abs().clamp_min(1e-8)).max()) for n in first["state"])
    report = {
        "runs": [spec for spec, _, _ in specs],
        "compute_dtypes": [first["dtype"], second["dtype"]],
        "seconds": [round(first["seconds"], 2), round(second["seconds"], 2)],
        "layers": len(first["state"]),
        "layers_with_identical_planes": planes_equal,
        "min_fraction_of_equal_plane_words": round(min(bits_agree), 6),
        "max_relative_scale_difference": scale_diff,
        "logits_max_abs_difference": float((first["logits"] - second["logits"]).abs().max()),
        "logits_scale": float(second["logits"].abs().max()),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
