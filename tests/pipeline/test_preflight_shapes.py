"""The preflight reads the source model's configuration alone to check the settings against its shapes."""

from __future__ import annotations

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
