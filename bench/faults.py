"""Run the fault, bad-input and security tests (tests/faults) and print what each case showed.

    python bench/faults.py [-k EXPR]

Each row is one case: what is expected, what was observed (pass, skip and its reason, or the first line
of the failure), and the data lost. The tests themselves assert that nothing was lost or half-written (no
partial checkpoint, branch unchanged, finished blocks kept), so "none" is reported only for a passing case,
"n/a" for a case skipped on this machine (e.g. a CPU-only check on a machine with CUDA). Exit status 0 when
every case that ran passed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Test function name (without parameters) -> (case, expected behaviour).
CASES: dict[str, tuple[str, str]] = {
    "test_killed_run_recomputes_only_unfinished_blocks_and_matches_an_uninterrupted_run": (
        "SIGKILL during calibration, rerun",
        "only unfinished blocks recomputed; tensor sha256 = uninterrupted run",
    ),
    "test_transient_fault_is_retried_with_backoff": (
        "Hub {param} twice during commit",
        "retried with backoff (0.05 s, 0.1 s), then one clean commit",
    ),
    "test_persistent_fault_leaves_the_branch_untouched": (
        "Hub {param} on every attempt",
        "PublishError after 3 attempts; staging branch unchanged",
    ),
    "test_flow_fails_clearly_tags_the_version_and_a_later_run_publishes": (
        "Hub down during the flow's publish",
        "flow fails, MLflow version publish_status=failed, rerun stages cleanly",
    ),
    "test_unreachable_mlflow_server_is_found_in_seconds": ("MLflow server unreachable", "PreflightError in < 10 s"),
    "test_missing_mlflow_database_folder": ("MLflow sqlite folder missing", "PreflightError naming the folder"),
    "test_flow_stops_before_heavy_work_when_mlflow_is_down": (
        "MLflow down, flow started",
        "fails before download; no work folder",
    ),
    "test_unreachable_prefect_api_is_one_line_before_anything_runs": (
        "Prefect API unreachable",
        "one line, exit 1, nothing written",
    ),
    "test_unreachable_mlflow_from_the_demo_command": ("MLflow unreachable (demo command)", "one line, exit 1"),
    "test_a_failed_gate_from_the_demo_command_ends_in_one_line": ("Quality gate failed (demo command)",
                                                                  "one line, exit 1"),
    "test_expected_failures_of_the_demo_are_one_line_and_unexpected_ones_keep_their_traceback": (
        "Gate fails / publish refused / publish bug (demo command)",
        "one line and Failed(reason), exit 1; a bug keeps its traceback",
    ),
    "test_the_demos_prefect_defaults_hold_when_prefect_was_imported_first_and_the_users_settings_win": (
        "Prefect's ephemeral server slow to start (demo command)",
        "waits 120 s, not Prefect's 20 s; a user's setting wins",
    ),
    "test_only_expected_errors_lose_their_traceback_in_task_run_logs_and_none_with_mobiquant_debug": (
        "Expected vs unexpected error in task-run logs",
        "expected on one line; others, and all with MOBIQUANT_DEBUG=1, keep tracebacks",
    ),
    "test_concurrent_runs_of_different_and_of_the_same_model": (
        "3 concurrent runs (2 models, one twice)",
        "all succeed; each block calibrated once; published = recorded sha256",
    ),
    "test_cli_full_disk_is_one_line_and_leaves_no_output": (
        "disk full writing checkpoint (CLI)",
        "one line, exit 1, no output dir",
    ),
    "test_full_disk_keeps_the_previous_checkpoint": ("disk full on --force overwrite", "previous checkpoint intact"),
    "test_size_limited_file_in_a_real_process": (
        "RLIMIT_FSIZE while writing (real process)",
        "one line, exit 1, no output dir",
    ),
    "test_flow_full_disk_leaves_no_checkpoint_and_publishes_nothing": (
        "disk full in the flow",
        "flow fails; no checkpoint, no release, no MLflow version",
    ),
    "test_cli_bad_model_folder": ("CLI: {param}", "one line naming it, exit 1, nothing written"),
    "test_flow_bad_model_folder": ("flow: {param}", "one-line error, no captures/blocks/runs/release/MLflow run"),
    "test_cli_allow_pickle_states_the_risk_and_opts_in": (
        "pickle weights, --allow-pickle",
        "refused by default; flag help states the risk",
    ),
    "test_cli_bad_hub_reference": ("CLI: hub {param}", "one line naming it, exit 1"),
    "test_flow_bad_hub_reference_is_not_retried": ("flow: hub {param}", "one-line error, not retried, nothing written"),
    "test_cli_budget_outside_range": ("CLI: budget outside [2, 2K]", "one line, exit 1"),
    "test_invalid_flow_parameters_are_one_line": ("parameters: {param}", "one-line InvalidParametersError"),
    "test_invalid_parameters_stop_the_flow_before_anything": ("flow: budget 9 bits", "fails before any file"),
    "test_shipped_deployment_parameters_are_valid_and_a_bad_one_is_not": (
        "deployment parameters (prefect.yaml)",
        "shipped valid; broken refused",
    ),
    "test_a_local_dask_cluster_without_cuda_refuses_a_cuda_compute_dtype_before_any_work": (
        "bfloat16 on a local Dask cluster, no CUDA",
        "PreflightError before any work; a remote cluster is not checked",
    ),
    "test_a_bf16_end_to_end_stage_on_a_cpu_without_bf16_instructions_is_refused_before_any_work": (
        "bf16 end-to-end stage on a CPU without bf16 units",
        "one-line PreflightError before any work; bf16 CPUs, float32 and no stage pass",
    ),
    "test_a_database_store_without_its_driver_is_one_line_and_keeps_its_password_out": (
        "MLflow database store, driver missing",
        "one-line PreflightError, password masked",
    ),
    "test_pack_unpack_round_trip_and_prefixes": ("packing: random codes, odd shapes", "exact round trip, prefixes"),
    "test_every_code_value_survives_packing": ("packing: all 4^K values (K={param})", "exact round trip"),
    "test_sign_bit_words_round_trip": ("packing: bit 31 set", "exact round trip"),
    "test_plane_layout_matches_a_bit_by_bit_reference": ("packing: plane layout", "bit by bit as documented"),
    "test_codes_in_any_integer_dtype_and_layout_pack_alike": (
        "packing: int32, non-contiguous codes",
        "same planes as contiguous int64",
    ),
    "test_too_few_planes_is_a_clear_error": ("packing: too few planes", "clear ValueError"),
    "test_slicing_extreme_values": ("slicing: denormals, constant groups, outliers", "finite, codes in range"),
    "test_planted_token_appears_in_no_output": (
        "planted HF token",
        "absent from files, MLflow, Prefect API, Hub, output",
    ),
    "test_token_from_the_credential_store": ("token from credential store", "accepted without HF_TOKEN"),
    "test_repo_is_public_only_when_configured": ("repo visibility", "private unless configured"),
    "test_download_is_pinned_to_the_resolved_commit": ("branch moves during download", "files of the resolved sha"),
    "test_remote_code_and_pickles_are_never_downloaded": ("repo with .py and .bin", "not fetched; no code runs"),
}


@dataclass
class Row:
    case: str
    expected: str
    observed: str = "not run"
    seconds: float = 0.0
    passed: bool = False
    skipped: bool = False


@dataclass
class Collector:
    """A pytest plugin keeping one row per test, filled from the test reports."""

    rows: dict[str, Row] = field(default_factory=dict)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name, _, param = report.nodeid.split("::")[-1].partition("[")
        param = param.rstrip("]")
        case, expected = CASES.get(name, (name, "passes"))
        row = self.rows.setdefault(report.nodeid, Row(case.format(param=param), expected))
        row.seconds += report.duration
        if report.skipped:  # skipif marks skip in setup, a skip call in the test body: not run, not failed
            row.skipped, row.observed = True, _skip_reason(report)
        elif report.when == "call" or report.failed:
            row.passed = report.passed and row.observed in ("not run", "as expected")
            if report.failed:
                row.observed = _first_line(report)
            elif row.observed == "not run":
                row.observed = "as expected"


def _skip_reason(report: pytest.TestReport) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return "skipped: " + " ".join(reason.removeprefix("Skipped: ").split())[:100]


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr)
    return f"FAILED ({report.when}): " + " ".join(message.split())[:100]


def print_table(rows: list[Row]) -> None:
    headers = ("case", "expected", "observed", "data lost")
    lines = [(r.case, r.expected, f"{r.observed} ({r.seconds:.1f} s)",
              "none" if r.passed else "n/a" if r.skipped else "CHECK") for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the fault cases and print a table of the results.")
    parser.add_argument("-k", dest="keyword", help="only the cases whose test name matches (pytest -k)")
    args = parser.parse_args(argv)
    collector = Collector()
    pytest_args = ["-q", "-p", "no:cacheprovider", "--no-header", "-o", "console_output_style=classic"]
    pytest_args += ["-k", args.keyword] if args.keyword else []
    started = time.monotonic()
    code = pytest.main([*pytest_args, str(ROOT / "tests" / "faults")], plugins=[collector])
    rows = list(collector.rows.values())
    if not rows:
        print("no case ran (see pytest's output above)")
        return 1
    print()
    print_table(rows)
    passed = sum(r.passed for r in rows)
    skipped = sum(r.skipped and not r.passed for r in rows)
    ran = len(rows) - skipped
    print(f"\n{passed}/{ran} cases as expected ({skipped} skipped on this machine) in "
          f"{time.monotonic() - started:.0f} s; data lost: "
          f"{'none' if passed == ran else 'see the rows marked CHECK'}")  # fmt: skip
    return 0 if code == 0 and passed == ran else 1


if __name__ == "__main__":
    # The fault tests import flows/, tasks/ and registry/ from the checkout, as they do under pytest.
    sys.path[0] = str(ROOT)
    sys.exit(main())
