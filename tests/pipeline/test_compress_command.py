"""``python -m flows.compress``: a deployment's parameters from prefect.yaml, overridden from the command line, run
in this process through the same ``compress`` flow as a deployment run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import flows.compress
from flows.compress import deployment_parameters, main, with_overrides
from flows.params import InvalidParametersError
from tests.pipeline.conftest import tiny_params

ROOT = Path(__file__).resolve().parents[2]


def test_deployment_parameters_are_the_compress_deployments_of_prefect_yaml() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    compress_deployments = [d for d in spec["deployments"] if d["entrypoint"] == "flows/compress.py:compress"]
    assert {d["name"] for d in compress_deployments} >= {"llama", "demo"}
    for deployment in compress_deployments:
        assert deployment_parameters(deployment["name"]) == deployment["parameters"]
    # A copy: changing it does not change the next caller's.
    changed = deployment_parameters("demo")
    changed["publish"]["root"] = "elsewhere"
    assert deployment_parameters("demo")["publish"].get("root") != "elsewhere"
    # Another flow's deployment is not a compress deployment.
    other = next(d["name"] for d in spec["deployments"] if d["entrypoint"] != "flows/compress.py:compress")
    with pytest.raises(InvalidParametersError, match=rf"no compress deployment '{other}' in .*prefect.yaml \(there: "):
        deployment_parameters(other)


def test_overrides_are_yaml_values_and_dotted_keys_set_nested_fields() -> None:
    params = {"model": "a/b", "samples": 16, "publish": {"kind": "local", "root": "out"}, "budgets": [3.0]}
    got = with_overrides(params, ["samples=64", "budgets=[2.5, 4]", "publish.root=elsewhere", "model=org/name",
                                  "gate.max_ratio_to_fp={4.0: 1.1}", "revision=null", "end_to_end_lr=5.0e-4"])
    assert got == {"model": "org/name", "samples": 64, "publish": {"kind": "local", "root": "elsewhere"},
                   "budgets": [2.5, 4], "gate": {"max_ratio_to_fp": {4.0: 1.1}}, "revision": None,
                   "end_to_end_lr": 5e-4}
    assert params["publish"]["root"] == "out" and params["samples"] == 16, "the given parameters are not changed"
    for bad, why in [("samples", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"),
                     ("model.name=x", "model is not a mapping"), ("budgets=[3, 4", "the value is not YAML")]:
        with pytest.raises(InvalidParametersError, match=why):
            with_overrides(params, [bad])


def test_bad_command_lines_are_one_line_and_run_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the flow ran")

    monkeypatch.setattr(flows.compress, "compress", must_not_run)
    listed = tmp_path / "list.yaml"
    listed.write_text("- samples: 4\n")
    cases = [
        (["--deployment", "nope"], "no compress deployment 'nope'"),
        (["--set", "samples"], "--set 'samples': expected KEY=VALUE"),
        (["--params", str(listed)], f"--params {listed}: expected a mapping of parameters"),
        (["--params", str(tmp_path / "missing.yaml")], "No such file or directory"),
        # Parameters the flow refuses: checked before Prefect starts a run.
        (["--deployment", "demo", "--set", "samples=0"], "invalid parameters: samples:"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mobiquant compress: error: ") and message in err[0], (argv, err)
    assert list(tmp_path.iterdir()) == [listed]


def test_a_params_file_is_merged_into_the_deployments_parameters_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: dict[str, Any] = {}
    monkeypatch.setattr(flows.compress, "run_locally", lambda params, prog: ran.update(params) or 0)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"publish:\n  root: {tmp_path / 'here'}\nsamples: 8\nbudgets: [3.0]\n")
    deployment = deployment_parameters("demo")
    assert main(["--deployment", "demo", "--params", str(params_file), "--set", "publish.staging_branch=review"]) == 0
    # The file's root and the --set field join the deployment's other publish fields; lists and values replace.
    assert ran["publish"] == {**deployment["publish"], "root": str(tmp_path / "here"), "staging_branch": "review"}
    assert ran["samples"] == 8 and ran["budgets"] == [3.0]
    assert {k: v for k, v in ran.items() if k not in ("publish", "samples", "budgets")} == {
        k: v for k, v in deployment.items() if k not in ("publish", "samples", "budgets")}
    # A mapping set whole replaces the deployment's.
    assert main(["--deployment", "demo", "--set", "publish={kind: local, root: x}"]) == 0
    assert ran["publish"] == {"kind": "local", "root": "x"}


def test_the_command_runs_the_flow_with_the_deployments_parameters_and_the_overrides(
    tiny_model: Path, tmp_path: Path, prefect_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tiny_params(tiny_model, tmp_path, budgets=[4.0])
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(params))
    argv = ["--deployment", "demo", "--params", str(params_file), "--set", "group_size=64",
            "--set", f"publish.root={tmp_path / 'staged-here'}"]  # fmt: skip
    assert main(argv) == 0
    printed = dict(line.split(":", 1) for line in capsys.readouterr().out.strip().splitlines())
    checkpoint = Path(printed["checkpoint"].strip())
    with open(checkpoint / "config.json") as config:
        assert json.load(config)["quantization_config"]["group_size"] == 64, "--set applied over --params"
    staged = Path(printed["staged"].strip())
    assert staged.is_relative_to(tmp_path / "staged-here") and (staged / "config.json").is_file()
    # The model of --params over the deployment's (SmolLM2).
    assert printed["MLflow"].strip() == "mobiquant-tiny-llama version 1 (alias candidate)"
