"""A loaded MoBiQuant model shared like any transformers model: push_to_hub, then from_pretrained from the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from transformers import AutoModelForCausalLM

from mobiquant.checkpoint import LOAD_GUARD, CheckpointError, load_checkpoint, mobi_layers, save_checkpoint
from mobiquant.sources import SourceError
from tests.pipeline.hub_server import HubServer
from tests.tiny_models import VOCAB, logits, quantize_tiny, set_uniform, tiny_model


def test_push_to_hub_round_trips_with_identical_logits(hub: HubServer, tmp_path: Path) -> None:
    original = quantize_tiny(tiny_model("qwen2", seed=21), seed=21)
    folder = save_checkpoint(original, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.push_to_hub("tester/tiny-mobiquant")
    # The other way to the Hub: save_pretrained with push_to_hub.
    loaded.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="tester/tiny-mobiquant-2")
    ids = torch.randint(0, VOCAB, (2, 10))
    for repo_id in ("tester/tiny-mobiquant", "tester/tiny-mobiquant-2"):
        repo = hub.state.repos[repo_id]
        files = set(repo.commits[repo.branches["main"]].files)
        assert {"config.json", "model.safetensors"} <= files and not any(f.endswith((".bin", ".pt")) for f in files)
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
        assert config["transformers_weights"] == LOAD_GUARD
        downloaded = AutoModelForCausalLM.from_pretrained(repo_id)
        assert len(mobi_layers(downloaded)) == len(mobi_layers(original))
        for setting in [1, 3, 4, None]:
            set_uniform(original, setting, threshold=1.2)
            set_uniform(downloaded, setting, threshold=1.2)
            assert torch.equal(logits(original, ids), logits(downloaded, ids)), (repo_id, setting)


def test_a_model_that_cannot_be_saved_creates_no_hub_repository(hub: HubServer, tmp_path: Path) -> None:
    folder = save_checkpoint(quantize_tiny(tiny_model("llama", seed=22), seed=22), tmp_path / "ckpt")
    partial = load_checkpoint(folder, max_slices=2)
    with pytest.raises(CheckpointError, match="holds 2 of 4 slices"):
        partial.push_to_hub("tester/partial")
    with pytest.raises(CheckpointError, match="holds 2 of 4 slices"):
        partial.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="tester/partial-2")
    assert not hub.state.repos and not (tmp_path / "local").exists()


def test_load_checkpoint_takes_a_hub_id(hub: HubServer, tmp_path: Path) -> None:
    original = quantize_tiny(tiny_model("llama", seed=23), seed=23)
    folder = save_checkpoint(original, tmp_path / "ckpt")
    api = HfApi()
    api.create_repo("tester/elastic")
    api.upload_folder(repo_id="tester/elastic", folder_path=folder)
    loaded = load_checkpoint("tester/elastic", max_slices=2)
    assert all(layer.stored_slices == 2 for layer in mobi_layers(loaded).values())
    set_uniform(original, 2)
    ids = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(logits(original, ids), logits(loaded, ids))
    with pytest.raises(SourceError, match="tester/absent not found on the Hugging Face Hub"):
        load_checkpoint("tester/absent")
    with pytest.raises(SourceError, match="no such file or folder"):
        load_checkpoint(tmp_path / "absent")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, r"tester/plain@v1 is not a model repository: it has no config\.json"),
        ({"model_type": "llama"}, "tester/plain@v1 is not a MoBiQuant checkpoint"),
        ({"model_type": "llama", "quantization_config": "mobiquant"}, "tester/plain@v1 is not a MoBiQuant checkpoint"),
        ({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}, "is not a MoBiQuant checkpoint"),
    ],
)
def test_load_checkpoint_refuses_a_hub_repository_that_is_no_checkpoint_before_fetching_weights(
    hub: HubServer, tmp_path: Path, config: dict | None, message: str
) -> None:
    files = {"model.safetensors": b"weights that must not be downloaded"}
    if config is not None:
        files["config.json"] = json.dumps(config).encode()
    repo = hub.state.add_repo("tester/plain", files)
    repo.tags["v1"] = repo.branches["main"]
    with pytest.raises((SourceError, CheckpointError), match=message) as refused:
        load_checkpoint("tester/plain", revision="v1")
    assert "\n" not in str(refused.value)
    assert not [path for _, path in hub.state.requests if path.endswith(".safetensors")]
    cached = {file.name for file in (tmp_path / "hf-home" / "hub").glob("models--*/snapshots/*/*")}
    assert cached == ({"config.json"} if config is not None else set())
