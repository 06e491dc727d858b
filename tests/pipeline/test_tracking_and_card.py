"""MLflow records (batched metrics, code version, the model version's source) and the model card's content."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import mobiquant
from flows.params import CompressParams
from registry import release, tracking
from registry.hashing import tree_manifest
from registry.report import PLOT_NAME, EvaluationSetup, QuantizedModel, model_card
from tasks.gate import GateCheck

REPO_ROOT = Path(__file__).resolve().parents[2]
VALIDATION = {
    "fp": {"ppl": 10.0},
    "budgets": [{"target_bits": 3.0, "avg_bits": 3.01, "ppl": 14.0}],
    "uniform": [{"slices": 1, "avg_bits": 2.0, "ppl": 40.0}],
    "rtn": [],
    "tokens": 1000,
}
MODEL = QuantizedModel.of({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "num_hidden_layers": 3,
                           "quantization_config": {"linears": ["self_attn.qkv_proj", "mlp.down_proj"]}})


def test_log_run_batches_metrics_and_tags_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    batches: list[tuple[int, int]] = []
    real_log_batch = MlflowClient.log_batch

    def counting_log_batch(self: MlflowClient, run_id: str, metrics=(), params=(), tags=(), **kwargs) -> None:
        batches.append((len(metrics), len(params)))
        real_log_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("one request per value")

    monkeypatch.setattr(MlflowClient, "log_batch", counting_log_batch)
    monkeypatch.setattr(MlflowClient, "log_metric", refused)
    monkeypatch.setattr(MlflowClient, "log_param", refused)
    curve = [float(step) / 7 for step in range(1200)]
    params = {f"option_{i:03d}": i for i in range(150)} | {"hub_token": "hf_secret"}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("report")
    run_id = tracking.log_run(
        uri, experiment="mobiquant/tiny", run_name="r1", params=params, metrics={"ppl_fp": 10.5},
        step_metrics={"loss_block_000_stage1": curve}, artifacts_dir=tmp_path / "report", tags={"gate": "passed"},
    )  # fmt: skip
    # 150 params in batches of 100; 1201 metric values in batches of 1000.
    assert batches == [(0, 100), (0, 50), (1000, 0), (201, 0)]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.metrics["ppl_fp"] == 10.5 and run.data.params["option_149"] == "149"
    assert "hub_token" not in run.data.params
    history = client.get_metric_history(run_id, "loss_block_000_stage1")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(enumerate(curve))
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    tags = run.data.tags
    assert tags["mobiquant.version"] == mobiquant.__version__
    assert tags["mobiquant.git_commit"] == tags["mlflow.source.git.commit"] == commit.stdout.strip()
    assert tags["mobiquant.git_dirty"] in ("true", "false") and tags["gate"] == "passed"
    # Reading an artifact back (promotion does) leaves no temporary folder behind.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    assert tracking.run_artifact_text(uri, run_id, "report.md") == "report"
    assert list(scratch.iterdir()) == []


def test_code_tags_outside_a_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tracking, "_CODE_ROOT", tmp_path)
    assert tracking.code_tags() == {"mobiquant.version": mobiquant.__version__, "mobiquant.git_commit": "unknown"}


@pytest.mark.parametrize("kind", ["local", "hub"])
def test_model_version_source_is_the_published_repo(tmp_path: Path, kind: str) -> None:
    publish = {"kind": kind, "root": str(tmp_path / "published"), "repo_id": "tester/tiny-mobiquant"}
    if kind == "hub":
        publish["endpoint"] = "http://127.0.0.1:9"
    params = CompressParams(model="tester/tiny", mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", publish=publish)
    (tmp_path / "report").mkdir()
    recorded = release.record(
        params, source={"source": "tester/tiny", "sha": "abc", "kind": "hub"},
        bundle={"overhead": 0.1, "report_dir": str(tmp_path / "report"), "repo_id": "tester/tiny-mobiquant",
                "model": MODEL.tags()},
        validation=VALIDATION, checks=[], passed=True, stages={}, blocks=[], checkpoint_dir=tmp_path / "work" / "ckpt",
        run_name="r1",
    )  # fmt: skip
    version = MlflowClient(params.mlflow_uri).get_model_version(params.model_name(), recorded["version"])
    expected = {
        "local": (tmp_path / "published" / "tester" / "tiny-mobiquant").resolve().as_uri(),
        "hub": "http://127.0.0.1:9/tester/tiny-mobiquant",
    }[kind]
    assert version.source == expected
    assert version.tags["work.checkpoint_dir"] == str((tmp_path / "work" / "ckpt").resolve())
    # A reviewer sees what was quantized on the version itself.
    assert {k: version.tags[k] for k in ("model_type", "architecture", "quantized_linears")} == {
        "model_type": "phi3", "architecture": "Phi3ForCausalLM",
        "quantized_linears": "self_attn.qkv_proj,mlp.down_proj"}


def test_experts_gptq_curves_reach_mlflow_as_a_mean_and_a_max_per_projection(tmp_path: Path) -> None:
    """One series per expert's linear would be some 18k for a 128-expert, 48-block model: the run holds, per block
    and projection, the mean over the experts and the worst expert at each slice count; the dense linears' GPTQ
    curves and the stage and router curves keep their names and values."""
    rng = np.random.default_rng()
    experts, slices, projections = 5, 4, ("gate_proj", "up_proj", "down_proj")
    blocks, expected = [], {}
    for index in (0, 3):
        dense = {"stage1": rng.random(7).tolist(), "gptq self_attn.q_proj": rng.random(slices).tolist(),
                 "gptq self_attn.o_proj": rng.random(slices).tolist(), "router_fit_residual": rng.random(3).tolist(),
                 "stage2": rng.random(7).tolist()}
        # As mobiquant.calibration.block lists them: expert by expert, each one's projections.
        errors = rng.random((experts, len(projections), slices))
        losses = dict(dense)
        for e in range(experts):
            for p, projection in enumerate(projections):
                losses[f"gptq mlp.experts.{e}.{projection}"] = errors[e, p].tolist()
        blocks.append({"block": index, "losses": losses})
        expected |= {f"loss_block_{index:03d}_{name}": curve for name, curve in dense.items()}
        for p, projection in enumerate(projections):
            folded = f"loss_block_{index:03d}_gptq mlp.experts.{projection}"
            expected[f"{folded} mean"] = errors[:, p].mean(axis=0).tolist()
            expected[f"{folded} max"] = errors[:, p].max(axis=0).tolist()
    tuning_losses = rng.random(6).tolist()
    params = CompressParams(model="tester/tiny", mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            publish={"kind": "local", "root": str(tmp_path / "published")})
    (tmp_path / "report").mkdir()
    recorded = release.record(
        params, source={"source": "tester/tiny", "sha": "abc", "kind": "hub"},
        bundle={"overhead": 0.1, "report_dir": str(tmp_path / "report"), "repo_id": "tester/tiny-mobiquant",
                "model": MODEL.tags()},
        validation=VALIDATION, checks=[], passed=False, stages={}, blocks=blocks,
        checkpoint_dir=tmp_path / "work" / "ckpt", run_name="r1",
        end_to_end={"steps": 6, "losses": tuning_losses, "seconds": 1.0},
    )  # fmt: skip
    client = MlflowClient(params.mlflow_uri)
    logged = {name for name in client.get_run(recorded["run_id"]).data.metrics if name.startswith("loss_block_")}
    assert logged == set(expected)
    tuning = sorted(client.get_metric_history(recorded["run_id"], "end_to_end_loss"), key=lambda m: m.step)
    np.testing.assert_allclose([m.value for m in tuning], tuning_losses, rtol=1e-12, atol=0)
    assert not [name for name in logged if re.search(r"experts\.\d", name)]
    for name, curve in expected.items():
        history = sorted(client.get_metric_history(recorded["run_id"], name), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(len(curve))), name
        np.testing.assert_allclose([m.value for m in history], curve, rtol=1e-12, atol=0, err_msg=name)


def test_evaluation_setup_cuts_windows_as_perplexity_does(tmp_path: Path) -> None:
    params = CompressParams(model="tester/tiny", evaluation_data="wikitext2:test", eval_seqlen=256)
    setup = release.evaluation_setup(params, VALIDATION, {"max_position_embeddings": 128})
    assert setup == EvaluationSetup("wikitext2:test", 128, 7, "float32")
    capped = CompressParams(model="tester/tiny", eval_seqlen=256, eval_max_windows=2)
    assert release.evaluation_setup(capped, VALIDATION, {}).windows == 2
    assert release.evaluation_setup(params, {**VALIDATION, "fp": {"ppl": 1.0, "dtype": "bfloat16"}}, {}).fp_dtype == (
        "bfloat16"
    )
    # A local text is named by its file name, not by the build machine's path.
    (tmp_path / "eval.txt").write_text("text")
    local = CompressParams(model="tester/tiny", evaluation_data=str(tmp_path / "eval.txt"))
    assert release.evaluation_setup(local, VALIDATION, {}).data == "eval.txt"


def test_model_card_names_data_windows_dtype_license_and_install() -> None:
    setup = EvaluationSetup("wikitext2:test", 256, 12, "float32")
    card = model_card(
        repo_id="tester/tiny-mobiquant", base_model="tester/tiny", license_id="apache-2.0", validation=VALIDATION,
        setup=setup, config={"num_slices": 4, "group_size": 64}, model=MODEL, files={"model.safetensors": "0" * 64},
    )  # fmt: skip
    assert "license: apache-2.0" in card and "License: `apache-2.0`, carried from the source model." in card
    assert "perplexity on `wikitext2:test`, 12 non-overlapping windows of 256 tokens" in card
    assert "| full precision (float32) | 32 | 10.000 |" in card
    assert mobiquant.INSTALL_HINT in card and "pip install mobiquant" not in card
    assert 'from_pretrained("tester/tiny-mobiquant", mobiquant_avg_bits=3.0)' in card
    assert ("Model: `Phi3ForCausalLM` (`phi3`), 3 blocks; quantized in every block: `self_attn.qkv_proj`, "
            "`mlp.down_proj`; embeddings, norms and the output head keep the source's dtype." in card)
    assert "- phi3" in card.split("---")[1]
    unlicensed = model_card(
        repo_id="tester/tiny-mobiquant", base_model=None, license_id=None, validation=VALIDATION, setup=setup,
        config={"num_slices": 4, "group_size": 64}, model=MODEL, files={},
    )  # fmt: skip
    assert "the source model names none" in unlicensed and "license: other" in unlicensed


def _checkpoint(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"quantization_config": {"num_slices": 4, "group_size": 32}}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def _bundle(run_dir: Path, checkpoint: Path, files: dict[str, str], checks: list[GateCheck]) -> dict:
    return release.build_bundle(
        run_dir, params=CompressParams(model="tester/tiny"),
        source={"source": "tester/tiny", "sha": "abc", "kind": "hub"}, checkpoint_dir=checkpoint,
        checkpoint_files=files, validation=VALIDATION, checks=checks, passed=all(c.passed for c in checks),
        stages={}, wall_seconds=1.0, blocks=[], kernels={},
    )  # fmt: skip


def test_the_report_takes_the_checkpoint_hashes_of_the_checkpoint_stage(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "checkpoint")
    # A digest no file has: were the weights read and hashed again, the bundle would carry the real one.
    recorded = {**tree_manifest(checkpoint), "model.safetensors": "f" * 64}
    bundle = _bundle(tmp_path / "run", checkpoint, recorded, [])
    published = tree_manifest(bundle["publish_dir"])
    assert set(bundle["files"]) == set(published) == {"config.json", "model.safetensors", PLOT_NAME, "README.md"}
    assert bundle["files"] == {**published, "model.safetensors": "f" * 64}
    assert "f" * 64 in (Path(bundle["publish_dir"]) / "README.md").read_text()


def test_a_rerun_after_a_failed_gate_keeps_the_failed_report(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "checkpoint")
    run_dir = tmp_path / "run"
    _bundle(run_dir, checkpoint, tree_manifest(checkpoint), [GateCheck("bits@4", 0.5, 0.0, False, "too far")])
    passed = _bundle(run_dir, checkpoint, tree_manifest(checkpoint), [GateCheck("bits@4", 0.5, 1.0, True, "")])
    assert "Gate: FAILED" not in Path(passed["report_path"]).read_text()
    (failed,) = run_dir.glob("report-failed-*")
    assert "Gate: FAILED" in (failed / "report.md").read_text()
    _bundle(run_dir, checkpoint, tree_manifest(checkpoint), [GateCheck("bits@4", 0.5, 1.0, True, "")])
    assert list(run_dir.glob("report-failed-*")) == [failed], "a passed report is replaced"


def test_a_mixture_of_experts_is_described_per_projection_not_per_expert() -> None:
    """Qwen3-30B-A3B quantizes 128 experts x 3 linears per block: the card and the run's tags fold them into one
    entry (a tag of 384 names would pass MLflow's length limit)."""
    experts = [f"mlp.experts.{e}.{p}" for e in range(128) for p in ("gate_proj", "up_proj", "down_proj")]
    model = QuantizedModel.of({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                               "num_hidden_layers": 48,
                               "quantization_config": {"linears": ["self_attn.q_proj", *experts]}})
    assert "`self_attn.q_proj`, `mlp.experts.<0-127>.gate_proj/up_proj/down_proj`;" in model.describe()
    assert model.tags()["quantized_linears"] == "self_attn.q_proj,mlp.experts.<0-127>.gate_proj/up_proj/down_proj"
