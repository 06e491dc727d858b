"""``mobiquant.quantize``: texts or a dataset in, an elastic copy out, the caller's model untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from mobiquant.api import quantize
from mobiquant.checkpoint import LOAD_GUARD, mobi_layers, save_checkpoint
from mobiquant.data import DataSourceError
from mobiquant.precision import set_precision
from tests.test_cli import TEXT, byte_tokenizer, sliced_tiny_llama, tiny_llama
from tests.test_model_use import assert_copy_runs_and_saves_itself, pickled

CONFIG = {"group_size": 32, "router_hidden": 4, "epochs_stage1": 1, "epochs_stage2": 1, "num_slices": 2}


def test_texts_in_elastic_copy_out_and_the_callers_model_untouched() -> None:
    model = tiny_llama().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = [TEXT[i : i + 900] for i in range(0, len(TEXT), 900)]
    quantized = quantize(model, byte_tokenizer(), texts, CONFIG, samples=4, seqlen=32, device="cpu", progress=False)
    assert all(torch.equal(v, before[k]) and v.dtype == torch.bfloat16 for k, v in model.state_dict().items())
    assert not mobi_layers(model) and len(mobi_layers(quantized)) == 14
    assert quantized.get_input_embeddings().weight.dtype == torch.bfloat16
    assert quantized.config.quantization_config["calibration_data"]["source"] == f"{len(texts)} texts"
    ids = torch.randint(0, 256, (1, 16))
    set_precision(quantized, avg_bits=3.0)
    with torch.no_grad():
        assert torch.isfinite(quantized(ids).logits).all()


def test_a_dataset_with_a_text_column_is_accepted_and_others_refused() -> None:
    rows = Dataset.from_dict({"text": [TEXT[:3000], TEXT[3000:]]})
    quantized = quantize(tiny_llama(), byte_tokenizer(), rows, CONFIG, samples=2, seqlen=32, device="cpu",
                         progress=False)
    assert quantized.config.quantization_config["calibration_data"]["source"] == "dataset of 2 rows"
    with pytest.raises(DataSourceError, match="no 'text' column"):
        quantize(tiny_llama(), byte_tokenizer(), Dataset.from_dict({"body": ["x"]}), CONFIG, device="cpu")
    with pytest.raises(DataSourceError, match="only strings"):
        quantize(tiny_llama(), byte_tokenizer(), [1, 2], CONFIG, device="cpu")


def test_the_quick_start_saves_with_save_pretrained_what_save_checkpoint_writes(tmp_path: Path) -> None:
    texts = [TEXT[i : i + 900] for i in range(0, len(TEXT), 900)]
    elastic = quantize(tiny_llama(), byte_tokenizer(), texts, CONFIG, samples=4, seqlen=32, device="cpu",
                       progress=False)
    elastic.save_pretrained(tmp_path / "pretrained")
    save_checkpoint(elastic, tmp_path / "checkpoint")
    written = json.loads((tmp_path / "pretrained" / "config.json").read_text())
    expected = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert written["transformers_weights"] == LOAD_GUARD
    assert written["quantization_config"] == expected["quantization_config"]
    assert written["mobiquant_avg_bits"] is None and written["mobiquant_slices"] is None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained", mobiquant_avg_bits=3.0)
    layers, reloaded = mobi_layers(elastic), mobi_layers(loaded)
    assert layers.keys() == reloaded.keys()
    for name, layer in layers.items():
        state = reloaded[name].state_dict()
        assert all(torch.equal(tensor, state[key]) for key, tensor in layer.state_dict().items()), name
    ids = torch.randint(0, 256, (2, 24))
    for setting in ({"slices": 1}, {"slices": 2}, {"avg_bits": 3.0}):
        set_precision(elastic, **setting)
        set_precision(loaded, **setting)
        with torch.no_grad():
            assert torch.equal(elastic(ids).logits, loaded(ids).logits), setting
    assert_copy_runs_and_saves_itself(elastic, pickled, tmp_path / "unpickled")


def test_an_elastic_model_and_windows_past_the_positions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already a MoBiQuant model"):
        quantize(sliced_tiny_llama(router_hidden=4), byte_tokenizer(), [TEXT], CONFIG, samples=2, seqlen=32,
                 device="cpu")
    with pytest.raises(ValueError, match="windows of 129 tokens are longer than the model's 128 positions"):
        quantize(tiny_llama(), byte_tokenizer(), [TEXT], CONFIG, samples=2, seqlen=129, device="cpu",
                 work_dir=tmp_path)
    assert not any(tmp_path.iterdir())
