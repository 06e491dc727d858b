"""What ``python -m flows.demo`` prints when a run fails: an expected failure (a failed gate, a refused publish) is
one line in Prefect's log and one from the demo, with no traceback, and the run ends Failed with the reason in
Prefect's API; an unexpected error keeps Prefect's traceback. Each case is a real demo run in its own process (its
own ephemeral Prefect server and logging) on the tiny model; the runs share one work folder, so the later ones
reuse the first one's blocks, checkpoint and measurements."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RUN = r"""
import asyncio, json, sys
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

import flows.demo as demo
import registry.release
from registry.publish import PublishError
from tests.pipeline.conftest import tiny_params

model, folder, case = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
gate = {"max_bits_error": 1.5, "routed_not_worse_than_rtn": False, "max_ratio_to_fp": {4.0: 2.0}}
if case == "gate":
    gate = {"max_bits_error": 0.0, "routed_not_worse_than_rtn": False}
demo.demo_parameters = lambda: tiny_params(model, folder, gate=gate)


def refused(*_args, **_kwargs):
    raise PublishError("the publish target refuses the release (test)")


def broken(*_args, **_kwargs):
    raise RuntimeError("an unexpected fault while publishing (test)")


if case != "gate":
    registry.release.stage_release = refused if case == "publish" else broken
argv = ["--work-dir", str(folder / "work"), "--mlflow-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--publish-root", str(folder / "published")]
try:
    code = demo.main(argv)
except RuntimeError as error:  # the unexpected error, which the demo does not catch: not printed here
    code = f"raised {error}"


async def compress_runs():
    async with get_client() as client:
        return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["compress"])))


states = [{"type": run.state.type.value, "message": run.state.message} for run in asyncio.run(compress_runs())]
print("RESULT " + json.dumps({"code": code, "states": states}), flush=True)
"""


def _demo(tiny_model: Path, folder: Path, case: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(folder / f"prefect-{case}"), OMP_NUM_THREADS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true")
    # Output goes to files, not pipes, and the run has its own session: a server process it leaves behind (Prefect
    # orphans one whose start timed out) can neither hold the test until its timeout nor outlive the test.
    stdout, stderr = folder / f"{case}.stdout", folder / f"{case}.stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "-c", RUN, str(tiny_model), str(folder), case], cwd=folder,
                                   env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            process.wait(timeout=900)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = stdout.read_text() + stderr.read_text()
    lines = [line for line in stdout.read_text().splitlines() if line.startswith("RESULT ")]
    assert lines, output
    return json.loads(lines[-1].removeprefix("RESULT ")), output


def test_expected_failures_of_the_demo_are_one_line_and_unexpected_ones_keep_their_traceback(
    tiny_model: Path, tmp_path: Path
) -> None:
    result, output = _demo(tiny_model, tmp_path, "gate")
    assert result["code"] == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("mobiquant demo: error: ")]
    assert len(errors) == 1 and errors[0].startswith("mobiquant demo: error: quality gate failed: bits@"), output
    [state] = result["states"]
    assert state["type"] == "FAILED" and state["message"].startswith("quality gate failed: bits@"), state

    result, output = _demo(tiny_model, tmp_path, "publish")
    assert result["code"] == 1, output
    assert "Traceback" not in output, output
    reason = "the publish target refuses the release (test)"
    assert [line for line in output.splitlines() if line.startswith("mobiquant demo: error: ")] == [
        f"mobiquant demo: error: {reason}"], output
    # The publish task's own failure is logged too, on one line.
    assert any("Task run failed with exception" in line and reason in line for line in output.splitlines()), output
    [state] = result["states"]
    assert state == {"type": "FAILED", "message": reason}, state

    result, output = _demo(tiny_model, tmp_path, "unexpected")
    assert result["code"] == "raised an unexpected fault while publishing (test)", output
    assert "Traceback" in output and "mobiquant demo: error" not in output, output
    assert output.count("RuntimeError: an unexpected fault while publishing (test)") >= 2, output
    [state] = result["states"]
    assert state["type"] == "FAILED" and "an unexpected fault while publishing (test)" in state["message"], state


def test_only_expected_errors_lose_their_traceback_in_task_run_logs_and_none_with_mobiquant_debug(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging

    from flows.compress import quiet_expected_errors
    from registry.publish import PublishError

    def logged(error: Exception) -> logging.LogRecord:
        """The record the task run engine logs for ``error``, after the task runs' logger's filters."""
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 0,
                                   "Task run failed with exception: %r", (error,), (type(error), error, None))
        assert logging.getLogger("prefect.task_runs").filter(record)
        return record

    quiet_expected_errors()
    quiet_expected_errors()
    filters = logging.getLogger("prefect.task_runs").filters
    assert sum(type(f).__name__ == "_ExpectedErrorsInOneLine" for f in filters) == 1
    assert logged(PublishError("refused")).exc_info is None
    assert logged(RuntimeError("a bug")).exc_info is not None
    monkeypatch.setenv("MOBIQUANT_DEBUG", "1")
    assert logged(PublishError("refused")).exc_info is not None


def test_the_demos_prefect_defaults_hold_when_prefect_was_imported_first_and_the_users_settings_win(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prefect reads the environment once, when first imported (here, by this suite): the demo's defaults must reach
    # Prefect's settings some other way. An os.environ.setdefault left the 20 s wait that failed a CI run.
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    import flows.compress
    from flows import demo

    seen: list[tuple[int, bool]] = []

    def preflight(_params: object) -> None:
        wait, analytics = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, PREFECT_SERVER_ANALYTICS_ENABLED
        seen.append((wait.value(), analytics.value()))
        raise flows.compress.PreflightError("stopped by the test")

    monkeypatch.setattr(flows.compress, "preflight", preflight)
    argv = ["--work-dir", str(tmp_path / "work"), "--publish-root", str(tmp_path / "published")]
    assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == 20  # Prefect's own default
    assert demo.main(argv) == 1
    assert seen == [(120, False)]
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 7}):
        assert demo.main(argv) == 1
    assert seen[-1][0] == 7
