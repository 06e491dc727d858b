"""The preflight reads the source model's configuration alone to check the settings against its shapes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flows.compress import preflight
from flows.params import InvalidParametersError, parse_params
from tests.pipeline.conftest import tiny_params
from tests.pipeline.hub_server import HubServer

NOT_SPLIT = r"block 0 self_attn\.q_proj: input size 64 is not a multiple of group_size 128"


def test_a_group_size_the_model_cannot_take_is_refused_before_its_weights_are_downloaded(
    hub: HubServer, tiny_model: Path, tmp_path: Path
) -> None:
    hub.state.add_folder("tester/tiny-llama", tiny_model)
    # The tiny model's attention takes 64 inputs: 128-column groups do not split it.
    params = parse_params(tiny_params(tiny_model, tmp_path, model="tester/tiny-llama", group_size=128))
    with pytest.raises(InvalidParametersError, match=rf"^tester/tiny-llama: {NOT_SPLIT}"):
        preflight(params)
    downloaded = [path for _method, path in hub.state.requests if "/resolve/" in path]
    assert downloaded and all(path.endswith("/config.json") for path in downloaded), downloaded

    with pytest.raises(InvalidParametersError, match=NOT_SPLIT) as info:
        preflight(parse_params(tiny_params(tiny_model, tmp_path, group_size=128)))
    assert "\n" not in str(info.value)
    preflight(parse_params(tiny_params(tiny_model, tmp_path, model="tester/tiny-llama")))


def test_a_config_that_is_json_but_not_an_object_is_refused_in_one_line(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "listed"
    shutil.copytree(tiny_model, model)
    shutil.copy(tiny_model.parent / "train.txt", tmp_path)
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(InvalidParametersError) as info:
        preflight(parse_params(tiny_params(model, tmp_path)))
    assert str(info.value) == f"{model}: {model / 'config.json'} is not a JSON object but a list"


def test_a_gguf_file_is_parsed_once_for_the_demos_preflight_and_the_flows_and_again_when_it_changes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing a real GGUF's metadata takes seconds (about 6 s for SmolLM2-135M); ``python -m flows.demo`` runs the
    preflight before starting the flow, and the flow runs it again."""
    from transformers import AutoConfig, LlamaConfig

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    config = LlamaConfig.from_pretrained(tiny_model)
    parsed = []

    def parse(folder: str, gguf_file: str) -> LlamaConfig:
        parsed.append(Path(folder) / gguf_file)
        return config

    monkeypatch.setattr(AutoConfig, "from_pretrained", parse)
    given = tiny_params(tiny_model, tmp_path, model=str(gguf))
    preflight(parse_params(given))
    preflight(parse_params(given))
    assert parsed == [gguf]
    with pytest.raises(InvalidParametersError, match=NOT_SPLIT):
        preflight(parse_params({**given, "group_size": 128}))
    assert parsed == [gguf], "the shapes are checked on the configuration parsed before"
    gguf.write_bytes(b"GGUF stand-in, rewritten")
    preflight(parse_params(given))
    assert parsed == [gguf, gguf], "a changed file is parsed again"
    # A replacement of the same size that keeps the modification time (cp -p, rsync -a).
    replacement = tmp_path / "replacement.gguf"
    replacement.write_bytes(b"GGUF stand-in, replaced!")
    kept = gguf.stat()
    assert replacement.stat().st_size == kept.st_size
    os.utime(replacement, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    os.replace(replacement, gguf)
    preflight(parse_params(given))
    assert parsed == [gguf, gguf, gguf], "a replaced file is parsed again"
