"""From a validated checkpoint to a reviewed release: the report bundle, MLflow records, staging, promotion."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import HfApi

from flows.params import CompressParams, PublishTarget
from mobiquant.arch import EXPERT_LINEAR
from registry import tracking
from registry.hashing import sha256_file
from registry.publish import LocalRepoTarget, PublishError, target_for
from registry.report import (
    PLOT_NAME,
    EvaluationSetup,
    QuantizedModel,
    markdown_report,
    model_card,
    plot_ppl_vs_bits,
    stage_table,
    unreached_linears,
)
from tasks.gate import GateCheck

MANIFEST_ARTIFACT = "sha256.json"
# A version tag: the repo tag its promotion has begun with (set before main moves).
PROMOTING_TAG = "publish.promoting"
# tasks.stages.validate runs the full-precision model in float32 (it does not record the dtype).
VALIDATION_FP_DTYPE = "float32"
# How mobiquant.calibration.block names a linear's GPTQ error curve in a block's losses: "gptq <linear>".
GPTQ_CURVE = "gptq "


def evaluation_setup(
    params: CompressParams, validation: dict[str, Any], model_config: dict[str, Any]
) -> EvaluationSetup:
    """The windows validation scored, cut as ``mobiquant.evaluation.perplexity`` cuts them.

    A window is at most the model's context; ``validation["tokens"]`` is the length of the evaluation text.
    """
    context = model_config.get("max_position_embeddings")
    seqlen = min(params.eval_seqlen, context) if isinstance(context, int) and context > 0 else params.eval_seqlen
    windows = validation["tokens"] // seqlen
    if params.eval_max_windows is not None:
        windows = min(windows, params.eval_max_windows)
    fp_dtype = validation["fp"].get("dtype", VALIDATION_FP_DTYPE)
    # A local text is named by its file name: the build machine's paths are not the card's business.
    data = Path(params.evaluation_data).name if Path(params.evaluation_data).exists() else params.evaluation_data
    return EvaluationSetup(data, seqlen, windows, fp_dtype)


def recorded_params(params: CompressParams) -> dict[str, Any]:
    """The run's parameters as the MLflow run and the report record them: the tracking URI without a password."""
    return {**params.model_dump(mode="json"), "mlflow_uri": tracking.redacted_uri(params.mlflow_uri)}


def publish_endpoint(publish: PublishTarget) -> str:
    """The Hub endpoint a release goes to (HF_ENDPOINT's when none is given; empty for a local target), recorded
    so that promotion, perhaps on another worker, goes to the same Hub."""
    if publish.kind != "hub":
        return ""
    return publish.endpoint or HfApi().endpoint


def published_uri(publish: PublishTarget, repo_id: str) -> str:
    """Where a release of ``repo_id`` is published: the repo, whose ``v<version>`` tag names a version's files."""
    target = target_for(publish, repo_id)
    if isinstance(target, LocalRepoTarget):
        return target.path.as_uri()
    return f"{target.api.endpoint.rstrip('/')}/{repo_id}"


def build_bundle(
    run_dir: Path,
    *,
    params: CompressParams,
    source: dict[str, Any],
    checkpoint_dir: Path,
    checkpoint_files: dict[str, str],
    validation: dict[str, Any],
    checks: list[GateCheck],
    passed: bool,
    stages: dict[str, dict[str, float]],
    wall_seconds: float,
    blocks: list[dict[str, Any]],
    kernels: dict[str, Any],
) -> dict[str, Any]:
    """Write ``report/`` (for people and MLflow) and ``publish/`` (exactly the files a release holds).

    ``checkpoint_files`` are the checkpoint's sha256s from the checkpoint stage: only the files added here are
    hashed, since reading a large model's weights once more would cost as long as hashing them did.
    """
    report_dir, publish_dir = run_dir / "report", run_dir / "publish"
    kept = report_dir / "gate.json"
    if kept.is_file() and not all(check["passed"] for check in json.loads(kept.read_text())):
        # A failed gate's report tells the reviewer why the run failed: the next run of the same checkpoint keeps it.
        report_dir.rename(run_dir / f"report-failed-{kept.stat().st_mtime_ns}")
    for folder in (report_dir, publish_dir):
        shutil.rmtree(folder, ignore_errors=True)
    report_dir.mkdir(parents=True)
    # Hard links: the release folder costs no extra disk and cannot drift from the validated checkpoint.
    shutil.copytree(checkpoint_dir, publish_dir, copy_function=os.link)
    plot_ppl_vs_bits(validation, publish_dir / PLOT_NAME)
    files = {**checkpoint_files, PLOT_NAME: sha256_file(publish_dir / PLOT_NAME)}
    shutil.copyfile(publish_dir / PLOT_NAME, report_dir / PLOT_NAME)
    model_config = json.loads((checkpoint_dir / "config.json").read_text())
    quant_config = model_config.get("quantization_config", {})
    model = QuantizedModel.of(model_config)
    setup = evaluation_setup(params, validation, model_config)
    repo_id = params.default_repo_id()
    card = model_card(
        repo_id=repo_id,
        base_model=source.get("base_model"),
        license_id=source.get("license"),
        validation=validation,
        setup=setup,
        config=quant_config or {"num_slices": params.num_slices, "group_size": params.group_size},
        model=model,
        files=files,
    )
    (publish_dir / "README.md").write_text(card)
    files = dict(sorted({**files, "README.md": sha256_file(publish_dir / "README.md")}.items()))
    stages_md, overhead = stage_table(stages, wall_seconds)
    extra = {"model": model.describe(), "publish target": f"{params.publish.kind} {repo_id}"}
    unreached = unreached_linears(blocks)
    if unreached:
        extra["no calibration token reached (codes from the weights alone, constant routers)"] = unreached
    report = markdown_report(
        title=f"MoBiQuant compression of {source['source']}",
        source=source,
        config={key: value for key, value in recorded_params(params).items() if key not in ("gate", "publish")},
        validation=validation,
        setup=setup,
        checks=checks,
        passed=passed,
        stages_md=stages_md,
        files=files,
        extra=extra,
    )
    (report_dir / "report.md").write_text(report)
    (report_dir / "quantization_config.json").write_text(json.dumps(quant_config, indent=2))
    (report_dir / MANIFEST_ARTIFACT).write_text(json.dumps(files, indent=2))
    (report_dir / "validation.json").write_text(json.dumps(validation, indent=2))
    (report_dir / "gate.json").write_text(json.dumps([c.to_dict() for c in checks], indent=2))
    (report_dir / "blocks.json").write_text(json.dumps(blocks, indent=2))
    (report_dir / "kernels.json").write_text(json.dumps(kernels, indent=2))
    return {
        "report_dir": str(report_dir),
        "report_path": str(report_dir / "report.md"),
        "publish_dir": str(publish_dir),
        "files": files,
        "repo_id": repo_id,
        "overhead": overhead,
        "model": model.tags(),
        "report_md": report,
    }


def metrics_of(validation: dict[str, Any], stages: dict[str, dict[str, float]], overhead: float) -> dict[str, float]:
    metrics = {"ppl_fp": validation["fp"]["ppl"], "orchestration_overhead": overhead}
    for row in validation["budgets"]:
        metrics[f"ppl_budget_{row['target_bits']:g}"] = row["ppl"]
        metrics[f"avg_bits_budget_{row['target_bits']:g}"] = row["avg_bits"]
    for row in validation["uniform"]:
        metrics[f"ppl_uniform_{row['slices']}"] = row["ppl"]
    for row in validation["rtn"]:
        metrics[f"ppl_rtn_{row['bits']}"] = row["ppl"]
    for name, times in stages.items():
        metrics[f"seconds_{name}"] = times["wall"]
    return {k.replace(".", "_"): v for k, v in metrics.items()}


# The end-to-end stage's loss at each step, as an MLflow step metric.
END_TO_END_SERIES = "end_to_end_loss"


def step_metrics_of(blocks: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each block's loss curves as MLflow step metrics ``loss_block_<NNN>_<curve>``.

    An expert linear's GPTQ curve (its error at 1, 2, ... slices) is folded over the block's experts into two
    series per projection, ``gptq mlp.experts.down_proj mean`` and ``... max`` (the worst expert): one series per
    expert would be some 18k for 128 experts in 48 blocks, more than MLflow's UI can list or a run logs quickly.
    ``blocks.json`` in the run's report keeps every expert's curve.
    """
    metrics: dict[str, list[float]] = {}
    for block in blocks:
        prefix = f"loss_block_{block['block']:03d}_"
        experts: dict[str, list[list[float]]] = {}
        for name, curve in block.get("losses", {}).items():
            found = EXPERT_LINEAR.fullmatch(name) if name.startswith(GPTQ_CURVE) else None
            if found is None:
                metrics[prefix + name] = curve
            else:
                # The group is "gptq <experts' path>.<projection>": the name without the expert's index.
                experts.setdefault(f"{found.group(1)}.{found.group(3)}", []).append(curve)
        for name, curves in experts.items():
            # Every expert's curve has one error per slice count; numpy refuses ragged ones and carries a NaN.
            errors = np.asarray(curves, dtype=np.float64)
            metrics[f"{prefix}{name} mean"] = errors.mean(axis=0).tolist()
            metrics[f"{prefix}{name} max"] = errors.max(axis=0).tolist()
    return metrics


def record(
    params: CompressParams,
    *,
    source: dict[str, Any],
    bundle: dict[str, Any],
    validation: dict[str, Any],
    checks: list[GateCheck],
    passed: bool,
    stages: dict[str, dict[str, float]],
    blocks: list[dict[str, Any]],
    checkpoint_dir: Path,
    run_name: str,
    end_to_end: dict[str, Any] | None = None,
) -> dict[str, str | None]:
    """The MLflow run, and for a passing run a registered version (alias set only once staged); ``end_to_end`` is
    the end-to-end stage's report (its loss at each step becomes the ``end_to_end_loss`` series)."""
    tags = {
        "source": source["source"],
        "source_sha": source["sha"],
        "source_kind": source["kind"],
        "gate": "passed" if passed else "failed",
        **bundle["model"],
    }
    run_id = tracking.log_run(
        params.mlflow_uri,
        experiment=f"mobiquant/{params.source_name()}",
        run_name=run_name,
        params=recorded_params(params),
        metrics=metrics_of(validation, stages, bundle["overhead"]),
        step_metrics={**step_metrics_of(blocks), **({END_TO_END_SERIES: end_to_end["losses"]} if end_to_end else {})},
        artifacts_dir=Path(bundle["report_dir"]),
        tags=tags,
    )
    if not passed:
        return {"run_id": run_id, "version": None}
    target = params.publish
    version_tags = {
        **tags,
        "gate_results": json.dumps({c.name: round(c.value, 6) for c in checks}),
        "publish.kind": target.kind,
        "publish.repo_id": bundle["repo_id"],
        "publish.root": str(Path(target.root).expanduser().resolve()),
        "publish.endpoint": publish_endpoint(target),
        "publish.staging_branch": target.staging_branch,
        "publish.public_on_promotion": str(target.public_on_promotion).lower(),
        "publish_status": "pending",
        # Where the run built the checkpoint (a work folder, for debugging); the version's source is the release.
        "work.checkpoint_dir": str(Path(checkpoint_dir).resolve()),
    }
    # The version's source is where its files are published, not the run's work folder (cleaned up or moved).
    version = tracking.register_version(
        params.mlflow_uri, params.model_name(), run_id, published_uri(target, bundle["repo_id"]), version_tags
    )
    return {"run_id": run_id, "version": version}


def stage_release(params: CompressParams, bundle: dict[str, Any], version: str, message: str) -> str:
    """One commit of the release files on the staging branch; the version becomes the ``candidate``."""
    name = params.model_name()
    target = target_for(params.publish, bundle["repo_id"])
    try:
        commit = target.stage(Path(bundle["publish_dir"]), message)
    except PublishError as error:
        tracking.tag_version(
            params.mlflow_uri, name, version, {"publish_status": "failed", "publish_error": str(error)}
        )
        # The commit is one atomic request: when it fails, the branch is as it was.
        raise PublishError(
            f"{error}; nothing was published to {bundle['repo_id']}@{params.publish.staging_branch}, "
            f"{name} version {version} is tagged publish_status=failed; run the flow again to retry"
        ) from error
    tracking.tag_version(
        params.mlflow_uri, name, version, {"publish_status": "staged", "publish.staged_commit": commit}
    )
    tracking.set_alias(params.mlflow_uri, name, tracking.CANDIDATE, version)
    return commit


def promote_release(
    mlflow_uri: str, name: str, *, version: str | None, alias: str | None, reviewer: str
) -> dict[str, str]:
    """A reviewer's decision: the staged files go to ``main`` (checked against MLflow's sha256 record); the
    version becomes ``champion`` and is no longer the ``candidate`` awaiting review."""
    database = tracking.sqlite_path(mlflow_uri)
    if database is not None and not database.is_file():
        # MLflow would create an empty database here and then not find the version.
        raise PublishError(f"no MLflow database at {database}: pass the mlflow_uri the compress run used")
    record_ = tracking.get_version(mlflow_uri, name, version=version, alias=alias)
    tags = record_.tags
    if tags.get("publish_status") == "published":
        # Promoting again would move main to a new commit under the old tag and overwrite who promoted it.
        raise PublishError(
            f"{name} version {record_.version} was already promoted by {tags.get('promoted_by', 'someone')} "
            f"(main commit {tags.get('publish.main_commit', '?')})"
        )
    if tags.get("gate") != "passed" or tags.get("publish_status") != "staged":
        raise PublishError(
            f"{name} version {record_.version} cannot be promoted: gate={tags.get('gate')}, "
            f"publish_status={tags.get('publish_status')}"
        )
    expected = json.loads(tracking.run_artifact_text(mlflow_uri, record_.run_id, MANIFEST_ARTIFACT))
    target_params = PublishTarget(
        kind=tags["publish.kind"],
        root=tags["publish.root"],
        repo_id=tags["publish.repo_id"],
        endpoint=tags.get("publish.endpoint") or None,
        staging_branch=tags["publish.staging_branch"],
        public_on_promotion=tags.get("publish.public_on_promotion") == "true",
    )
    target = target_for(target_params, tags["publish.repo_id"])
    tag = f"v{record_.version}"
    # The tag names the MLflow version: in a repo that already has it, it marks another release. A promotion of this
    # version that began before (and was interrupted) may have tagged main itself: it goes on.
    if tags.get(PROMOTING_TAG) != tag:
        target.check_tag_free(tag)
        tracking.tag_version(mlflow_uri, name, str(record_.version), {PROMOTING_TAG: tag})
    commit = target.promote(tags["publish.staged_commit"], expected, tag)
    tracking.tag_version(
        mlflow_uri,
        name,
        str(record_.version),
        {"publish_status": "published", "publish.main_commit": commit, "promoted_by": reviewer},
    )
    tracking.set_alias(mlflow_uri, name, tracking.CHAMPION, str(record_.version))
    tracking.drop_alias(mlflow_uri, name, tracking.CANDIDATE, str(record_.version))
    return {"version": str(record_.version), "commit": commit, "tag": tag, "repo_id": tags["publish.repo_id"]}
