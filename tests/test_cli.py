"""The ``mobiquant`` command on a tiny random Llama with a byte-level tokenizer (no network)."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import mobiquant
from mobiquant import cli, slicing
from mobiquant.arch import architecture_for
from mobiquant.calibration import CalibrationConfig
from mobiquant.checkpoint import load_checkpoint, replace_linears, save_checkpoint
from mobiquant.data import calibration_samples, evaluation_tokens
from mobiquant.evaluation import perplexity
from mobiquant.layers import MoBiLinear
from mobiquant.precision import calibrate_thresholds, hold_budget, set_precision
from mobiquant.slicing import slice_weight

TEXT = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}." for i in range(80))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (ByteLevel alphabet, no merges): a real, savable fast tokenizer."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def sliced_tiny_llama(router_hidden: int | None) -> LlamaForCausalLM:
    """``tiny_llama`` with every quantized linear replaced by its 4-slice, group-32 ``slice_weight`` layers."""
    model, arch = tiny_llama(), architecture_for("llama")
    dense = [{name: linear.weight.detach().clone() for name, linear in arch.quantized_linears(block).items()}
             for block in arch.block_list(model)]
    replace_linears(model, arch, num_slices=4, group_size=32, router_hidden=router_hidden)
    for block, weights in zip(arch.block_list(model), dense, strict=True):
        for name, layer in arch.quantized_linears(block).items():
            layer.load_sliced(slice_weight(weights[name], group_size=32, num_slices=4))
    return model


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    """A MoBiQuant checkpoint built by hand: slices from ``slice_weight``, random routers, calibrated thresholds."""
    model, tokenizer = sliced_tiny_llama(router_hidden=8), byte_tokenizer()
    calibrate_thresholds(model, calibration_samples(tokenizer, str(text_file), 4, 64, seed=0))
    out = tmp_path_factory.mktemp("ckpt") / "tiny-mobiquant"
    save_checkpoint(model, out, tokenizer)
    return out


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_usage(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    return int(exc.value.code or 0), capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- argument handling -------------------------------------------------------------------------------------------


def test_help_and_usage_errors(capsys: pytest.CaptureFixture) -> None:
    code, _ = run_usage(capsys, "--help")
    assert code == 0
    code, err = run_usage(capsys)
    assert code == 2 and "required" in one_line(err)
    code, err = run_usage(capsys, "quantize", "some/model")
    assert code == 2 and "-o/--output" in one_line(err)
    code, err = run_usage(capsys, "eval", "dir", "--uniform", "one,two")
    assert code == 2 and "comma-separated integers" in one_line(err)
    code, err = run_usage(capsys, "quantize", "m", "-o", "x", "--epochs", "1,2,3")
    assert code == 2 and "STAGE1,STAGE2" in one_line(err)
    code, err = run_usage(capsys, "quantize", "m", "-o", "x", "--mode", "diagonal")
    assert code == 2 and "invalid choice" in one_line(err)
    code, err = run_usage(capsys, "quantize", "m", "-o", "x", "--samples", "0")
    assert code == 2 and "positive integer" in one_line(err)


def test_help_lists_every_command_and_says_what_every_option_does() -> None:
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert [listed.dest for listed in commands._choices_actions] == list(commands.choices)
    assert set(commands.choices) == {"quantize", "eval", "thresholds", "info"}
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"mobiquant {name} {action.option_strings}"


def test_version_and_help_load_no_torch(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"mobiquant {mobiquant.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", mobiquant.__version__)
    script = (
        "import sys\n"
        "from mobiquant import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0\n"
        "print(sorted(name for name in ('torch', 'transformers', 'safetensors') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: mobiquant" in result.stdout and result.stdout.splitlines()[-1] == "[]"


def test_slices_stop_at_exact_16_bit_codes(capsys: pytest.CaptureFixture) -> None:
    for bad in ("9", "27", "40"):
        code, err = run_usage(capsys, "quantize", "m", "-o", "x", "--slices", bad)
        expected = f"at most 8 slices (16-bit codes; a 16-bit weight holds no more), got {bad}"
        assert code == 2 and expected in one_line(err)
    assert cli.build_parser().parse_args(["quantize", "m", "-o", "x", "--slices", "8"]).slices == 8
    assert cli.MAX_SLICES == slicing.MAX_SLICES


def test_epochs_accepts_one_or_two_values() -> None:
    assert cli._epochs("3") == (3, 3)
    assert cli._epochs("1,4") == (1, 4)


def test_precision_weights_parse_to_the_configs_tuple(capsys: pytest.CaptureFixture) -> None:
    from mobiquant.calibration.config import precision_weight_tuple

    args = cli.build_parser().parse_args(["quantize", "m", "-o", "x", "--precision-weights", "1:4,2:1,3:1"])
    assert precision_weight_tuple(args.precision_weights, 4) == (4.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"slice counts \[5\] outside 1..4"):
        precision_weight_tuple({5: 1.0}, 4)
    code, err = run_usage(capsys, "quantize", "m", "-o", "x", "--precision-weights", "1=4")
    assert code == 2 and "SLICES:WEIGHT" in one_line(err)
    assert cli.build_parser().parse_args(["quantize", "m", "-o", "x", "--damp", "0.25"]).damp == 0.25
    for flags, weighted in (([], True), (["--uniform-hessians"], False)):
        options = cli.calibration_options(cli.build_parser().parse_args(["quantize", "m", "-o", "x", *flags]), 64)
        assert CalibrationConfig(**options).loss_weighted_hessians is weighted
    args = cli.build_parser().parse_args(["quantize", "m", "-o", "x", "--clip-weights", "1:1,2:24,3:32"])
    assert precision_weight_tuple(args.clip_weights, 4) == (1.0, 24.0, 32.0, 0.0)
    for bad in ("0", "-1", "nan", "inf", "x"):
        code, err = run_usage(capsys, "quantize", "m", "-o", "x", "--damp", bad)
        assert code == 2 and "expected a positive number" in one_line(err)
    for flags, sweeps in (([], CalibrationConfig().descent_sweeps), (["--descent-sweeps", "3"], 3)):
        options = cli.calibration_options(cli.build_parser().parse_args(["quantize", "m", "-o", "x", *flags]), 64)
        assert CalibrationConfig(**options).descent_sweeps == sweeps
    for bad in ("-1", "1.5", "x"):
        code, err = run_usage(capsys, "quantize", "m", "-o", "x", "--descent-sweeps", bad)
        assert code == 2 and "expected a whole number >= 0" in one_line(err)
    for flags, tuning in (([], (0, CalibrationConfig().end_to_end_lr, "float32", "all")),
                          (["--end-to-end-steps", "16", "--end-to-end-lr", "1e-3", "--end-to-end-dtype", "bfloat16",
                            "--end-to-end-schedule", "rotate"], (16, 1e-3, "bfloat16", "rotate"))):
        options = cli.calibration_options(cli.build_parser().parse_args(["quantize", "m", "-o", "x", *flags]), 64)
        config = CalibrationConfig(**options)
        assert (config.end_to_end_steps, config.end_to_end_lr, config.end_to_end_dtype,
                config.end_to_end_schedule) == tuning
    for flag, bad, message in (("--end-to-end-steps", "-2", "expected a whole number >= 0"),
                               ("--end-to-end-lr", "0", "expected a positive number"),
                               ("--end-to-end-dtype", "float16", "invalid choice: 'float16'"),
                               ("--end-to-end-schedule", "random", "invalid choice: 'random'")):
        code, err = run_usage(capsys, "quantize", "m", "-o", "x", flag, bad)
        assert code == 2 and message in one_line(err)
    for option in ("--precision-weights", "--clip-weights"):
        for bad in ("1:inf,2:1", "1:nan,2:1"):
            args = cli.build_parser().parse_args(["quantize", "m", "-o", "x", option, bad])
            with pytest.raises(ValueError, match="finite non-negative weights"):
                CalibrationConfig(**cli.calibration_options(args, 64))
        code, err = run_usage(capsys, "quantize", "m", "-o", "x", option, "1:1,1:2")
        assert code == 2 and "1 slices weighted twice" in one_line(err)


def test_missing_checkpoint_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, err = run(capsys, "info", str(tmp_path / "nowhere"))
    assert code == 1 and out == "" and "no checkpoint directory" in one_line(err)
    code, _, err = run(capsys, "eval", str(tmp_path))
    assert code == 1 and "has no config.json" in one_line(err)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run(capsys, "info", str(tmp_path))
    assert code == 1 and "not a MoBiQuant checkpoint" in one_line(err)


def test_quantize_refuses_non_empty_output_before_loading(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(capsys, "quantize", "no/such/model", "-o", str(out))
    assert code == 1 and "not empty (use --force" in one_line(err)
    code, _, err = run(capsys, "quantize", "./no/such/model", "-o", str(tmp_path / "new"))
    assert code == 1 and "no such file or folder" in one_line(err)
    code, _, err = run(capsys, "quantize", "m", "-o", str(tmp_path / "missing" / "out"))
    assert code == 1 and "parent folder" in one_line(err)


# --- eval and info on a hand-built checkpoint ----------------------------------------------------------------


def test_eval_uniform_and_routed_json(capsys: pytest.CaptureFixture, checkpoint: Path, text_file: Path) -> None:
    code, out, err = run(
        capsys, "eval", str(checkpoint), "--data", str(text_file), "--uniform", "1,4", "--avg-bits", "3",
        "--seqlen", "64", "--max-windows", "3", "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["seqlen"] == 64 and report["windows"] == 3
    rows = report["results"]
    assert [(r["mode"], r["target"]) for r in rows] == [("uniform", 1), ("uniform", 4), ("routed", 3.0)]
    assert rows[0]["avg_bits"] == 2.0 and rows[1]["avg_bits"] == 8.0
    assert 2.0 < rows[2]["avg_bits"] < 8.0

    model = load_checkpoint(checkpoint)
    tokens = evaluation_tokens(byte_tokenizer(), str(text_file))
    for row, kwargs in zip(rows, [{"slices": 1}, {"slices": 4}, {"avg_bits": 3.0}], strict=True):
        set_precision(model, **kwargs)
        expected = perplexity(model, tokens, seqlen=64, max_windows=3, progress=False)
        assert row["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert rows[0]["perplexity"] > rows[1]["perplexity"]


def test_eval_hold_budget_runs_the_routed_budgets_held(
    capsys: pytest.CaptureFixture, checkpoint: Path, text_file: Path
) -> None:
    base = ("eval", str(checkpoint), "--data", str(text_file), "--seqlen", "64", "--max-windows", "3",
            "--device", "cpu")
    code, out, err = run(capsys, *base, "--uniform", "2", "--avg-bits", "3", "--hold-budget", "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert [(r["mode"], r["budget_held"]) for r in rows] == [("uniform", False), ("routed", True)]
    model = load_checkpoint(checkpoint)
    tokens = evaluation_tokens(byte_tokenizer(), str(text_file))
    with hold_budget(model, 3.0) as hold:
        expected = perplexity(model, tokens, seqlen=64, max_windows=3, progress=False)
    assert rows[1]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert rows[1]["avg_bits"] == pytest.approx(hold.meter.avg_bits, rel=1e-9)
    code, out, err = run(capsys, *base, "--avg-bits", "3", "--hold-budget")
    assert code == 0, err
    assert "routed 3 bits held" in out
    code, _, err = run(capsys, *base, "--avg-bits", "3", "--hold-budget", "--tasks", "arc_easy")
    assert code == 1 and "--hold-budget applies to perplexity" in one_line(err)


def test_eval_table_defaults_to_every_slice_count(
    capsys: pytest.CaptureFixture, checkpoint: Path, text_file: Path
) -> None:
    code, out, err = run(
        capsys, "eval", str(checkpoint), "--data", str(text_file), "--seqlen", "128", "--max-windows", "1"
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "1 windows of 128 tokens" in lines[0]
    assert [line.split()[:3] for line in lines[2:]] == [
        ["uniform", "1", "slice"], ["uniform", "2", "slices"], ["uniform", "3", "slices"], ["uniform", "4", "slices"]
    ]  # fmt: skip
    assert [float(line.split()[3]) for line in lines[2:]] == [2.0, 4.0, 6.0, 8.0]


def test_eval_bad_settings_are_one_line(capsys: pytest.CaptureFixture, checkpoint: Path, text_file: Path) -> None:
    base = ("eval", str(checkpoint), "--data", str(text_file), "--seqlen", "64", "--max-windows", "1")
    code, _, err = run(capsys, *base, "--uniform", "5")
    assert code == 1 and "--uniform 5: slice counts must be in 1..4" in one_line(err)
    code, _, err = run(capsys, *base, "--max-slices", "2", "--uniform", "3")
    assert code == 1 and "--uniform 3: slice counts must be in 1..2" in one_line(err)
    code, _, err = run(capsys, *base, "--avg-bits", "9")
    assert code == 1 and "average bits must be in [2, 8]" in one_line(err)
    code, _, err = run(capsys, *base, "--max-slices", "5")
    assert code == 1 and "the checkpoint has 4 slices" in one_line(err)
    code, _, err = run(capsys, "eval", str(checkpoint), "--data", "nonexistent/corpus.txt")
    assert code == 1 and "no such file or folder" in one_line(err)
    code, _, err = run(capsys, "eval", str(checkpoint), "--data", "wikitext2:dev")
    assert code == 1 and "unknown split" in one_line(err)


def test_eval_budgets_stop_at_the_slices_loaded(
    capsys: pytest.CaptureFixture, checkpoint: Path, text_file: Path
) -> None:
    base = ("eval", str(checkpoint), "--data", str(text_file), "--seqlen", "64", "--max-windows", "2", "--json")
    code, _, err = run(capsys, *base, "--max-slices", "2", "--avg-bits", "6")
    assert code == 1 and "--avg-bits 6: average bits must be in [2, 4] for the 2 slices loaded" in one_line(err)
    code, out, err = run(capsys, *base, "--max-slices", "2", "--avg-bits", "2,3,4")
    assert code == 0, err
    measured = [row["avg_bits"] for row in json.loads(out)["results"]]
    assert measured[0] == 2.0 and measured[2] == 4.0 and 2.0 < measured[1] < 4.0


def test_eval_device_that_torch_cannot_use_is_one_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, checkpoint: Path, text_file: Path
) -> None:
    base = ("eval", str(checkpoint), "--data", str(text_file), "--seqlen", "64", "--max-windows", "1")
    code, _, err = run(capsys, *base, "--device", "tpu0")
    assert code == 1 and "--device tpu0: not a torch device" in one_line(err)
    # A CPU-only build of torch, whatever this machine has.
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, *base, "--device", "cuda")
    assert code == 1 and f"--device cuda: this torch {torch.__version__} is built without CUDA" in one_line(err)
    # A CUDA build on a machine without a visible GPU.
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, _, err = run(capsys, *base, "--device", "cuda:1")
    assert code == 1 and "--device cuda:1: 0 CUDA device(s) visible" in one_line(err)


def test_truncated_or_inconsistent_checkpoint_is_one_line(
    capsys: pytest.CaptureFixture, tmp_path: Path, checkpoint: Path, text_file: Path
) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    for command in (("info", str(truncated)), ("eval", str(truncated), "--data", str(text_file), "--uniform", "1")):
        code, out, err = run(capsys, *command)
        assert code == 1 and out == "" and "corrupt or truncated checkpoint" in one_line(err), command
    inconsistent = tmp_path / "inconsistent"
    shutil.copytree(checkpoint, inconsistent)
    config = json.loads((inconsistent / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64
    (inconsistent / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "info", str(inconsistent))
    assert code == 1 and "checkpoint tensors disagree with its quantization_config" in one_line(err)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_slices", None, "quantization_config lacks num_slices"),
        ("threshold_bits", None, "quantization_config lacks threshold_bits"),
        ("group_size", 0, "group_size must be a positive multiple of 32, got 0"),
        ("linears", ["mlp.w9"], "'mlp.w9' is not a module of a llama block"),
    ],
)
def test_a_malformed_quantization_config_is_one_line(
    capsys: pytest.CaptureFixture, tmp_path: Path, checkpoint: Path, text_file: Path, key: str, value: object,
    message: str,
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    if value is None:
        del config["quantization_config"][key]
    else:
        config["quantization_config"][key] = value
    (broken / "config.json").write_text(json.dumps(config))
    for command in (
        ("info", str(broken)),
        ("eval", str(broken), "--data", str(text_file), "--uniform", "1"),
        ("thresholds", str(broken), "--data", str(text_file), "--samples", "1", "--seqlen", "64"),
    ):
        code, out, err = run(capsys, *command)
        assert code == 1 and out == "" and message in one_line(err), command


def test_eval_max_slices(capsys: pytest.CaptureFixture, checkpoint: Path, text_file: Path) -> None:
    code, out, err = run(
        capsys, "eval", str(checkpoint), "--data", str(text_file), "--seqlen", "64", "--max-windows", "1",
        "--max-slices", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert [r["avg_bits"] for r in json.loads(out)["results"]] == [2.0, 4.0]


def test_info(capsys: pytest.CaptureFixture, checkpoint: Path) -> None:
    code, out, err = run(capsys, "info", str(checkpoint), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_slices"] == 4 and summary["group_size"] == 32 and summary["router_hidden"] == 8
    assert summary["blocks"] == 2 and summary["quantized_layers"] == 14
    assert summary["thresholds_calibrated"] is True
    # 4 slices x 2 bits of codes, plus a float16 scale and zero per group of 32 weights, plus 4 float16 row
    # gains per output row.
    assert summary["code_bits_per_weight"] == 8.0
    assert summary["group_bits_per_weight"] == pytest.approx(32 / 32)
    shapes = summary["layers"].values()
    weights = sum(s["in"] * s["out"] * s["count"] for s in shapes)
    gain_bits = sum(4 * 16 * s["out"] * s["count"] for s in shapes) / weights
    assert summary["gain_bits_per_weight"] == pytest.approx(gain_bits)
    assert summary["bytes_per_weight"] == pytest.approx((9 + gain_bits) / 8)
    assert summary["layers"]["mlp.down_proj"] == {"in": 128, "out": 64, "count": 2}
    code, out, err = run(capsys, "info", str(checkpoint))
    assert code == 0, err
    assert f"bits/weight   {9 + gain_bits:.3f} (8.00 code + 1.000 scale/zero + {gain_bits:.3f} row gain)" in out
    assert "self_attn.q_proj" in out
    assert "4 (2/4/6/8 bits)" in out


def test_info_reads_no_weights_and_sees_uncalibrated_thresholds(
    capsys: pytest.CaptureFixture, tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """info lays the model out on the meta device: a 70B checkpoint's summary must not need 70B of memory."""
    import transformers
    from safetensors.torch import load_file, save_file

    from mobiquant.layers import UNCALIBRATED

    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(checkpoint, uncalibrated)
    tensors = load_file(uncalibrated / "model.safetensors")
    key = next(key for key in sorted(tensors) if key.endswith(".thresholds"))
    tensors[key] = torch.full_like(tensors[key], UNCALIBRATED)
    save_file(tensors, uncalibrated / "model.safetensors", metadata={"format": "pt"})

    def no_loading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("info loaded the model's weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(mobiquant.checkpoint, "load_checkpoint", no_loading)
    summaries = {}
    for folder in (checkpoint, uncalibrated):
        code, out, err = run(capsys, "info", str(folder), "--json")
        assert code == 0, err
        summaries[folder] = json.loads(out)
    assert summaries[checkpoint]["thresholds_calibrated"] is True
    assert summaries[uncalibrated]["thresholds_calibrated"] is False


# --- thresholds ------------------------------------------------------------------------------------------------

# Text far from TEXT: words of one letter, whose activations the routers score differently.
SERVING_TEXT = " ".join("z" * (1 + i * 7 % 9) for i in range(800))


def _layer_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_thresholds_refit_on_serving_text_changes_only_the_thresholds(
    capsys: pytest.CaptureFixture, tmp_path: Path, checkpoint: Path
) -> None:
    from mobiquant.precision import track_bits

    serving = tmp_path / "serving.txt"
    serving.write_text(SERVING_TEXT, encoding="utf-8")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    (ckpt / "README.md").write_text("# model card\n")  # in place: files the save does not write are kept
    code, _, err = run(capsys, "thresholds", str(ckpt), "--data", str(serving), "--samples", "4", "--seqlen", "64",
                       "--device", "cpu")
    assert code == 0, err
    assert (ckpt / "README.md").read_text() == "# model card\n"

    # Reference: the same samples, thresholds fitted in this process on the original checkpoint.
    samples = calibration_samples(byte_tokenizer(), str(serving), 4, 64, seed=0)
    expected = load_checkpoint(checkpoint)
    calibrate_thresholds(expected, samples)
    before, after = _layer_tensors(checkpoint), _layer_tensors(ckpt)
    assert before.keys() == after.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed and all(key.endswith(".thresholds") for key in changed), changed
    expected_tables = {name: t for name, t in expected.state_dict().items() if name.endswith(".thresholds")}
    for key in changed:
        torch.testing.assert_close(after[key], expected_tables[key], rtol=0, atol=0)

    quant = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert quant["threshold_data"] == {"source": str(serving), "samples": 4, "seqlen": 64, "seed": 0}
    assert quant["num_slices"] == 4 and quant["router_hidden"] == 8
    # On the text they were fitted on, a grid budget is met to within a token's share of a layer's slice
    # (256 tokens here); the thresholds fitted on TEXT miss it there by far more.
    spent = {}
    for folder in (ckpt, checkpoint):
        model = load_checkpoint(folder)
        set_precision(model, avg_bits=4.0)
        with track_bits(model) as meter, torch.no_grad():
            model(samples)
        spent[folder] = meter.avg_bits
    assert abs(spent[ckpt] - 4.0) <= 2 / 256 and abs(spent[checkpoint] - 4.0) > 0.05, spent


def test_thresholds_bad_input_is_one_line_and_changes_nothing(
    capsys: pytest.CaptureFixture, tmp_path: Path, checkpoint: Path, text_file: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    original = _folder_tree(ckpt)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    code, _, err = run(capsys, "thresholds", str(ckpt), "--data", str(short), "--samples", "4", "--seqlen", "64")
    assert code == 1 and "mobiquant thresholds: error:" in one_line(err)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me", encoding="utf-8")
    code, _, err = run(capsys, "thresholds", str(ckpt), "--data", str(text_file), "-o", str(taken))
    assert code == 1 and "not empty" in one_line(err)
    assert (taken / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert _folder_tree(ckpt) == original

    uniform_only = tmp_path / "uniform"
    save_checkpoint(sliced_tiny_llama(router_hidden=None), uniform_only, byte_tokenizer())
    code, _, err = run(capsys, "thresholds", str(uniform_only), "--data", str(text_file))
    assert code == 1 and "has no routers" in one_line(err)


def test_thresholds_refuses_windows_longer_than_the_model_context(
    capsys: pytest.CaptureFixture, checkpoint: Path, text_file: Path
) -> None:
    original = _folder_tree(checkpoint)
    code, out, err = run(capsys, "thresholds", str(checkpoint), "--data", str(text_file), "--samples", "1",
                         "--seqlen", "129")
    assert code == 1 and out == ""
    assert one_line(err).endswith("--seqlen 129 is longer than the model's 128 positions (max_position_embeddings): "
                                  "use a shorter seqlen")
    assert _folder_tree(checkpoint) == original


def test_thresholds_to_another_folder_leaves_the_source(
    capsys: pytest.CaptureFixture, tmp_path: Path, checkpoint: Path, text_file: Path
) -> None:
    original = _folder_tree(checkpoint)
    out = tmp_path / "served"
    code, _, err = run(capsys, "thresholds", str(checkpoint), "--data", str(text_file), "--samples", "2",
                       "--seqlen", "64", "--seed", "3", "-o", str(out))
    assert code == 0, err
    assert _folder_tree(checkpoint) == original
    assert json.loads((out / "config.json").read_text())["quantization_config"]["threshold_data"]["seed"] == 3
    load_checkpoint(out)


# --- quantize end to end --------------------------------------------------------------------------------------


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


QUICK = ("--samples", "2", "--seqlen", "32", "--epochs", "1,1", "--router-hidden", "4", "--slices", "3")


def test_quantize_writes_a_checkpoint(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    out = tmp_path / "ckpt"
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(out), "--data", str(text_file), *QUICK)
    assert code == 0, err
    assert "group size 64" in err, "the automatic group size is the largest of 128/64/32 that fits"
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["num_slices"] == 3 and quant["group_size"] == 64
    assert quant["calibration_data"] == {"source": str(text_file), "samples": 2, "seqlen": 32}
    assert quant["source_model"]["kind"] == "local"
    assert not (tmp_path / ".ckpt.mobiquant-work").exists()
    model = load_checkpoint(out)
    assert sum(isinstance(m, MoBiLinear) for m in model.modules()) == 14


def test_quantize_tunes_end_to_end_when_asked_and_shows_its_progress(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    work = ("--work-dir", str(tmp_path / "work"))
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(plain), "--data", str(text_file), *QUICK, *work)
    assert code == 0, err
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(tuned), "--data", str(text_file), *QUICK, *work,
                       "--end-to-end-steps", "2", "--end-to-end-lr", "0.01", "--end-to-end-weights", "2:1,3:2")
    assert code == 0, err
    assert "end-to-end tuning" in err and "calibrating blocks" in err
    quant = json.loads((tuned / "config.json").read_text())["quantization_config"]
    assert (quant["calibration"]["end_to_end_steps"], quant["calibration"]["end_to_end_lr"]) == (2, 0.01)
    assert quant["calibration"]["end_to_end_weights"] == [0.0, 1.0, 2.0]
    pairs = [(a, b) for a, b in zip(load_checkpoint(plain).modules(), load_checkpoint(tuned).modules(), strict=True)
             if isinstance(a, MoBiLinear)]
    assert all(torch.equal(a.planes, b.planes) and not torch.equal(a.scale, b.scale) for a, b in pairs)


def test_a_one_slice_checkpoint_is_written_and_evaluated(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    out = tmp_path / "ckpt"
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(out), "--data", str(text_file), *QUICK,
                       "--slices", "1")
    assert code == 0, err
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["num_slices"] == 1 and quant["calibration"]["row_gain_slices"] == 1
    code, out_text, err = run(capsys, "eval", str(out), "--data", str(text_file), "--seqlen", "32", "--uniform", "1",
                              "--max-windows", "2")
    assert code == 0, err
    row = next(line.split() for line in out_text.splitlines() if line.startswith("uniform 1 slice "))
    assert float(row[3]) == 2.0 and 1.0 < float(row[4]) < math.inf, out_text


def test_a_model_folder_without_a_tokenizer_is_named(
    capsys: pytest.CaptureFixture, tmp_path: Path, text_file: Path
) -> None:
    folder = tmp_path / "no-tokenizer"
    tiny_llama().save_pretrained(folder)
    capsys.readouterr()
    code, _, err = run(capsys, "quantize", str(folder), "-o", str(tmp_path / "c"), "--data", str(text_file), *QUICK)
    assert code == 1 and f"{folder} holds no tokenizer" in one_line(err), err
    assert not (tmp_path / "c").exists()


def test_failed_quantize_leaves_no_output(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    import mobiquant.calibration

    work_dirs: list[Path] = []

    def broken(_model: object, _samples: object, _config: object, work_dir: Path, **_kwargs: object) -> None:
        work_dirs.append(Path(work_dir))
        raise ValueError("calibration diverged")

    monkeypatch.setattr(mobiquant.calibration, "quantize_files", broken)
    out = tmp_path / "ckpt"
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(out), "--data", str(text_file), *QUICK)
    assert code == 1 and err.strip().splitlines()[-1] == "mobiquant quantize: error: calibration diverged"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.") and "work" not in p.name] == []
    # The resumable work folder is per source model, beside the output.
    assert work_dirs[0].parent == tmp_path / ".ckpt.mobiquant-work" and len(work_dirs[0].name) == 16


def test_quantize_reports_too_little_text(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    code, _, err = run(
        capsys, "quantize", str(model_folder), "-o", str(tmp_path / "c"), "--data", str(text_file),
        "--samples", "1000", "--seqlen", "64",
    )  # fmt: skip
    assert code == 1 and "fewer than 1000 samples x 64" in err.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists()


def test_same_seed_device_and_threads_give_the_same_checkpoint(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    outputs = [tmp_path / "first", tmp_path / "second"]
    for out in outputs:
        argv = ["quantize", str(model_folder), "-o", str(out), "--data", str(text_file), *QUICK, "--device", "cpu",
                "--threads", "1"]
        code, _, err = run(capsys, *argv)
        assert code == 0, err
        assert "on cpu (1 CPU threads)" in err
    first, second = ((out / "model.safetensors").read_bytes() for out in outputs)
    assert first == second


def _folder_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_over_the_source_or_a_foreign_folder_is_refused_and_nothing_deleted(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    capsys.readouterr()
    before = _folder_tree(tmp_path)
    cases = {
        str(model_folder): "is the source model",
        str(tmp_path): "contains the",
        str(tmp_path / "work-here"): "is the work folder",
    }
    for output, message in cases.items():
        code, _, err = run(capsys, "quantize", str(model_folder), "-o", output, "--force", "--data", str(text_file),
                           "--work-dir", str(tmp_path / "work-here"), *QUICK)
        assert code == 1 and message in one_line(err), err
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(foreign), "--force", "--data",
                       str(text_file), *QUICK)
    assert code == 1 and "holds no MoBiQuant checkpoint" in one_line(err)
    assert _folder_tree(tmp_path) == {**before, "photos/cat.jpg": b"\xff\xd8"}, "nothing deleted or written"


def test_a_named_work_folder_loses_only_the_runs_own_work(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    work = tmp_path / "work"
    (work / "other-model").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(tmp_path / "ckpt"), "--data", str(text_file),
                       "--work-dir", str(work), *QUICK)
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "other-model"]
    before = _folder_tree(tmp_path)
    cases = [
        (model_folder / "work", tmp_path / "elsewhere", "is inside the source model"),
        (work, work / "ckpt", "is inside the work folder"),
    ]
    for work_dir, output, message in cases:
        code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(output), "--data", str(text_file),
                           "--work-dir", str(work_dir), *QUICK)
        assert code == 1 and message in one_line(err), err
    assert _folder_tree(tmp_path) == before, "nothing written or deleted"


def test_dangling_output_link_and_cuda_on_a_cpu_torch_fail_before_work(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capsys.readouterr()
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(link), "--data", str(text_file), *QUICK)
    assert code == 1 and "symbolic link to nothing" in one_line(err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(tmp_path / "new"), "--device", "cuda",
                       "--data", str(text_file), *QUICK)
    assert code == 1 and "--device cuda: this torch" in one_line(err) and "built without CUDA" in err
    assert not (tmp_path / ".new.mobiquant-work").exists() and not (tmp_path / "new").exists()


def test_link_output_empty_output_and_file_work_dir_fail_before_work(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path, checkpoint: Path
) -> None:
    capsys.readouterr()
    (tmp_path / "target").mkdir()
    shutil.copytree(checkpoint, tmp_path / "earlier")
    (tmp_path / "a-file").write_text("mine")
    for name, target in (("link", "target"), ("link2", "earlier")):
        (tmp_path / name).symlink_to(target)
    before = _folder_tree(tmp_path)
    for name, target in (("link", "target"), ("link2", "earlier")):
        code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(tmp_path / name), "--force", "--data",
                           str(text_file), *QUICK)
        assert code == 1 and one_line(err) == (f"mobiquant quantize: error: output {tmp_path / name} is a symbolic "
                                               f"link to {target}: name the folder itself")
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(tmp_path / "new"), "--work-dir",
                       str(tmp_path / "a-file"), "--data", str(text_file), *QUICK)
    assert code == 1 and one_line(err).endswith(f"work folder {tmp_path / 'a-file'} exists and is not a folder")
    code, err = run_usage(capsys, "quantize", str(model_folder), "-o", "", "--data", str(text_file), *QUICK)
    assert code == 2 and "argument -o/--output: expected a path, got an empty one" in one_line(err)
    code, err = run_usage(capsys, "thresholds", str(checkpoint), "-o", "", "--data", str(text_file))
    assert code == 2 and "expected a path, got an empty one" in one_line(err)
    assert _folder_tree(tmp_path) == before, "nothing written or deleted"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a-file", "earlier", "link", "link2", "target", "tiny-llama"]
    )


def test_force_replaces_an_earlier_checkpoint(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path, checkpoint: Path
) -> None:
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint, out)
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(out), "--force", "--data", str(text_file),
                       *QUICK)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["num_slices"] == 3


def test_a_second_run_on_a_work_folder_in_use_fails_at_once_in_one_line(
    capsys: pytest.CaptureFixture, tmp_path: Path, model_folder: Path, text_file: Path
) -> None:
    import fcntl

    from mobiquant.calibration.driver import LOCK_FILE

    work = tmp_path / "work"
    code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(tmp_path / "first"), "--data", str(text_file),
                       "--work-dir", str(work), "--keep-work", *QUICK)
    assert code == 0, err
    (run_work,) = work.iterdir()
    before = _folder_tree(tmp_path)
    # Held as another calibration (another process, or another open() here) holds it while it runs.
    with open(run_work / LOCK_FILE, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run(capsys, "quantize", str(model_folder), "-o", str(tmp_path / "second"), "--data",
                           str(text_file), "--work-dir", str(work), "--damp", "0.05", *QUICK)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line == (f"mobiquant quantize: error: work folder {run_work} is in use by another calibration running "
                    "now: wait for it, or give this run its own work folder (--work-dir, or work_dir=)"), err
    assert "Traceback" not in err
    assert _folder_tree(tmp_path) == before, "nothing written"
    assert not (tmp_path / "second").exists()
