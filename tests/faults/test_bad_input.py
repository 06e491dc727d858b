"""Bad input: one clear line naming the problem, a non-zero exit, nothing written or published.

Every case runs through the command (``mobiquant quantize``/``eval``) and, where the flow takes the same
input, through the ``compress`` flow's parameters.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import LlamaConfig, LlamaForCausalLM

from flows.compress import compress
from flows.params import InvalidParametersError, PublishTarget, parse_params
from mobiquant import cli
from tests.faults.runs import ROOT
from tests.pipeline.conftest import tiny_params
from tests.pipeline.hub_server import HubServer

QUICK = ("--samples", "2", "--seqlen", "16", "--epochs", "1,1", "--router-hidden", "4", "--slices", "2")


def _copy(tiny_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "bad-model"
    shutil.copytree(tiny_model, folder)
    shutil.copy(tiny_model.parent / "train.txt", folder.parent / "train.txt")
    return folder


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def unsupported(folder: Path) -> None:
    _edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])


def truncated(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def corrupt_header(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16
    weights.write_bytes(bytes(data))


def _poison(folder: Path, name: str, value: float) -> None:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[3] = value
    model.save_pretrained(folder)


def nan_in_linear(folder: Path) -> None:
    _poison(folder, "model.layers.1.self_attn.q_proj.weight", float("nan"))


def inf_in_embedding(folder: Path) -> None:
    _poison(folder, "model.embed_tokens.weight", float("inf"))


def _rewrite_tensors(folder: Path, name: str, tensor: torch.Tensor | None) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    if tensor is None:
        del state[name]
    else:
        state[name] = tensor
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def missing_tensor(folder: Path) -> None:
    _rewrite_tensors(folder, "model.layers.1.mlp.down_proj.weight", None)


def misshaped_tensor(folder: Path) -> None:
    """A hidden size the config does not have: transformers would only warn and fill the tensor at random."""
    _rewrite_tensors(folder, "model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 32))


def small_vocabulary(folder: Path) -> None:
    """The model's vocabulary shrunk to 16 tokens while the tokenizer keeps its own: another model's tokenizer."""
    config = LlamaConfig.from_pretrained(folder)
    config.vocab_size = 16
    LlamaForCausalLM(config).save_pretrained(folder)


def pickle_only(folder: Path) -> None:
    state = LlamaForCausalLM.from_pretrained(folder).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


# case: (how the folder is spoiled, extra flow parameters, extra CLI arguments, message)
FOLDER_CASES: dict[str, tuple[Callable[[Path], None] | None, dict[str, Any], tuple[str, ...], str]] = {
    "unsupported-architecture": (unsupported, {}, (), "unsupported architecture 'gpt2'"),
    "missing-tensor": (missing_tensor, {}, (), "lacks the tensor model.layers.1.mlp.down_proj.weight"),
    "misshaped-tensor": (misshaped_tensor, {}, (), "model.layers.0.self_attn.o_proj.weight in"),
    "truncated-safetensors": (truncated, {}, (), "corrupt safetensors file"),
    "corrupt-safetensors": (corrupt_header, {}, (), "corrupt safetensors file"),
    "nan-weights": (nan_in_linear, {}, (), "model.layers.1.self_attn.q_proj.weight contains NaN or Inf"),
    "inf-weights": (inf_in_embedding, {}, (), "model.embed_tokens.weight contains NaN or Inf"),
    "group-size": (None, {"group_size": 48}, ("--group-size", "48"), "group"),
    "tokenizer-mismatch": (small_vocabulary, {}, (), "vocabulary has 16: the tokenizer does not belong"),
    "pickle-weights": (pickle_only, {}, (), "only pickle weights"),
    "short-calibration-text": (None, {"samples": 200, "seqlen": 64}, ("--samples", "200", "--seqlen", "64"), "fewer"),
    "unknown-linear": (None, {"module_precision_weights": {"v_prj": {1: 1.0}}},
                       ("--module-precision-weights", "v_prj=1:1"), "'v_prj', which is not a quantized linear"),
    "damp": (None, {"damp": 20.0}, ("--damp", "20"), "damp"),
}
# What ``check_model_shapes`` says about 48-column groups on 64-wide inputs (slicing.py's wording).
GROUP_SIZE_MESSAGE = r"block 0 self_attn\.q_proj: .*48"


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[-1].startswith(f"mobiquant {argv[0]}: error: ")
    return err[-1]


def _nothing_written(tmp_path: Path, output: Path | None = None) -> None:
    if output is not None:
        assert not output.exists() and not list(output.parent.glob(f".{output.name}*")), "no output, no work folder"
    work = tmp_path / "work"
    for stage in ("captures", "blocks", "runs"):
        assert not (work / stage).exists(), f"{stage} written for bad input"
    assert not (tmp_path / "published").exists()


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_cli_bad_model_folder(case: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spoil, _params, args, message = FOLDER_CASES[case]
    folder = _copy(tiny_model, tmp_path)
    if spoil is not None:
        spoil(folder)
    out = tmp_path / "ckpt"
    argv = ["quantize", str(folder), "-o", str(out), "--data", str(folder.parent / "train.txt"), *QUICK, *args]
    line = _cli_error(capsys, argv)
    if case == "group-size":
        assert any(s in line for s in ("multiple of", "divis")) and "48" in line, line
    else:
        assert message in line, line
    _nothing_written(tmp_path, out)


# The flow shares the checks with the command; these cases cover each stage that checks (source, model, data).
FLOW_FOLDER_CASES = ["unsupported-architecture", "truncated-safetensors", "nan-weights", "group-size",
                     "tokenizer-mismatch", "pickle-weights", "short-calibration-text", "unknown-linear",
                     "damp"]  # fmt: skip


@pytest.mark.parametrize("case", FLOW_FOLDER_CASES)
def test_flow_bad_model_folder(case: str, tiny_model: Path, tmp_path: Path, prefect_env: Path) -> None:
    spoil, params, _args, message = FOLDER_CASES[case]
    folder = _copy(tiny_model, tmp_path)
    if spoil is not None:
        spoil(folder)
    run = tiny_params(folder, tmp_path, **params)
    with pytest.raises(ValueError) as info:
        compress(**run)
    text = str(info.value)
    assert "\n" not in text
    if case == "group-size":
        assert "48" in text and any(s in text for s in ("multiple of", "divis")), text
    else:
        assert message in text, text
    _nothing_written(tmp_path)
    client = MlflowClient(run["mlflow_uri"])
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_cli_allow_pickle_states_the_risk_and_opts_in(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()  # type: ignore[union-attr]
    assert "--allow-pickle" in help_text and "runs any code" in " ".join(help_text.split())
    folder = _copy(tiny_model, tmp_path)
    pickle_only(folder)
    line = _cli_error(
        capsys, ["quantize", str(folder), "-o", str(tmp_path / "x"), "--data", str(folder.parent / "train.txt"), *QUICK]
    )
    assert "loading them can run code" in line and "--allow-pickle" in line
    out = tmp_path / "ckpt"
    argv = [
        "quantize",
        str(folder),
        "-o",
        str(out),
        "--data",
        str(folder.parent / "train.txt"),
        "--allow-pickle",
        *QUICK,
    ]
    assert cli.main(argv) == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin")), "the output is safetensors"


# --------------------------------------------------------------------------------------------------------------
# Hub references


@pytest.fixture
def hub_models(hub: HubServer, tiny_model: Path) -> HubServer:
    hub.state.add_folder("tester/tiny", tiny_model)
    hub.state.add_folder("tester/private", tiny_model, private=True)
    hub.state.add_folder("tester/gated", tiny_model, gated=True)
    return hub


HUB_CASES = {
    "missing-repo": ("tester/missing", None, "tester/missing not found on the Hugging Face Hub"),
    "missing-revision": ("tester/tiny", "v9", "revision 'v9' not found in tester/tiny"),
    "private-without-token": ("tester/private", None, "or it is private and no token that can read it was given"),
    "gated-without-token": ("tester/gated", None, "tester/gated is gated"),
}


@pytest.mark.parametrize("case", sorted(HUB_CASES))
def test_cli_bad_hub_reference(
    case: str,
    hub_models: HubServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    repo, revision, message = HUB_CASES[case]
    out = tmp_path / "ckpt"
    argv = ["quantize", repo, "-o", str(out), *QUICK] + (["--revision", revision] if revision else [])
    assert message in _cli_error(capsys, argv)
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing-repo", "private-without-token"])
def test_flow_bad_hub_reference_is_not_retried(
    case: str,
    hub_models: HubServer,
    tiny_model: Path,
    tmp_path: Path,
    prefect_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    repo, revision, message = HUB_CASES[case]
    with pytest.raises(ValueError, match=message):
        compress(**tiny_params(tiny_model, tmp_path, model=repo, revision=revision))
    info_calls = [p for m, p in hub_models.state.requests if p.startswith(f"/api/models/{repo}")]
    assert len(info_calls) == 1, "a permanent error is not retried"
    _nothing_written(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Budgets and parameters


def test_cli_budget_outside_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    quant = {"quant_method": "mobiquant", "format": "bitplanes-msb-int32-v2", "num_slices": 2, "group_size": 32,
             "router_hidden": 4, "linears": ["mlp.up_proj"], "threshold_bits": [2.0, 4.0]}
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    for bits in ("1.5", "4.5"):
        line = _cli_error(capsys, ["eval", str(checkpoint), "--avg-bits", bits, "--data", str(tmp_path)])
        assert line.endswith(f"--avg-bits {bits}: average bits must be in [2, 4] for this checkpoint")


INVALID_PARAMETERS = {
    "budget-below-2": ({"budgets": [1.5]}, "budgets [1.5] are outside [2, 8]"),
    "budget-above-2k": (
        {"budgets": [4.0], "num_slices": 2, "gate": {"max_ratio_to_fp": {3.0: 2.0}}, "group_size": 32},
        None,
    ),
    "budget-over-slices": ({"budgets": [5.0], "num_slices": 2}, "budgets [5.0] are outside [2, 4]"),
    "no-samples": ({"samples": 0}, "samples: Input should be greater than or equal to 1"),
    "no-routers": ({"router_hidden": 0}, "router_hidden: Input should be greater than or equal to 1"),
    "unknown-mode": ({"mode": "fast"}, "mode: Input should be 'parallel' or 'sequential'"),
    "unknown-publish-kind": ({"publish": {"kind": "s3"}}, "publish.kind: Input should be 'local' or 'hub'"),
    "token-in-parameters": (
        {"publish": {"kind": "hub", "token": "hf_x"}},
        "publish.token: Extra inputs are not permitted",
    ),
    "main-as-staging": (
        {"publish": {"staging_branch": "main"}},
        "staging_branch must be a plain branch name other than 'main'",
    ),
    "bad-repo-id": ({"publish": {"repo_id": "no-owner"}}, "repo_id must look like 'owner/name'"),
    "bad-arch": ({"kernel_archs": ["ampere"]}, "kernel_archs must look like 'sm_80'"),
    "old-arch": ({"kernel_archs": ["sm_90", "sm_75"]}, "kernel_archs ['sm_75'] are older than sm_80"),
    "missing-model-path": ({"model": "./no/such/folder"}, "is neither an existing folder/GGUF file nor a hub id"),
}


@pytest.mark.parametrize("case", sorted(INVALID_PARAMETERS))
def test_invalid_flow_parameters_are_one_line(case: str, tiny_model: Path, tmp_path: Path) -> None:
    changes, message = INVALID_PARAMETERS[case]
    values = tiny_params(tiny_model, tmp_path, **changes)
    if message is None:
        parse_params(values)
        return
    with pytest.raises(InvalidParametersError) as info:
        parse_params(values)
    assert "\n" not in str(info.value) and message in str(info.value), str(info.value)


def test_invalid_parameters_stop_the_flow_before_anything(tiny_model: Path, tmp_path: Path, prefect_env: Path) -> None:
    with pytest.raises(InvalidParametersError, match=r"budgets \[9\.0\] are outside \[2, 8\]"):
        compress(**tiny_params(tiny_model, tmp_path, budgets=[9.0]))
    # Nothing but Prefect's own home (where it may persist the run's failure).
    assert [p.name for p in tmp_path.iterdir() if p.name != "prefect-home"] == []


def test_shipped_deployment_parameters_are_valid_and_a_bad_one_is_not() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    compress_deployments = [d for d in spec["deployments"] if d["entrypoint"] == "flows/compress.py:compress"]
    assert {d["name"] for d in compress_deployments} >= {"llama", "demo"}
    for deployment in compress_deployments:
        parse_params(deployment["parameters"])
        broken = {**deployment["parameters"], "budgets": [0.5]}
        with pytest.raises(InvalidParametersError, match="outside"):
            parse_params(broken)
    assert "token" not in PublishTarget.model_fields
