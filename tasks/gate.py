"""The quality gate: the checks a candidate checkpoint must pass before anything is published.

``validation`` is the dictionary written by the validate task::

    {"fp": {"ppl": 41.5},
     "budgets": [{"target_bits": 4.0, "avg_bits": 4.02, "ppl": 43.1}, ...],
     "uniform": [{"slices": 2, "avg_bits": 4.0, "ppl": 44.0}, ...],
     "rtn": [{"bits": 4, "ppl": 45.2}, ...]}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from flows.params import GateThresholds


class GateFailedError(RuntimeError):
    """The candidate missed at least one threshold: nothing is published."""


@dataclass(frozen=True)
class GateCheck:
    name: str
    value: float
    limit: float
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _budget(validation: dict[str, Any], bits: float) -> dict[str, Any] | None:
    return next((row for row in validation["budgets"] if math.isclose(row["target_bits"], bits)), None)


def evaluate_gate(validation: dict[str, Any], thresholds: GateThresholds) -> list[GateCheck]:
    """Every check with its measured value and limit (a missing measurement fails its check)."""
    checks: list[GateCheck] = []
    fp = validation["fp"]["ppl"]
    for row in validation["budgets"]:
        error = abs(row["avg_bits"] - row["target_bits"])
        checks.append(
            GateCheck(
                name=f"bits@{row['target_bits']:g}",
                value=error,
                limit=thresholds.max_bits_error,
                passed=error <= thresholds.max_bits_error,
                detail=f"measured {row['avg_bits']:.3f} average bits for a budget of {row['target_bits']:g}",
            )
        )
        if not math.isfinite(row["ppl"]):
            checks.append(GateCheck(f"finite@{row['target_bits']:g}", row["ppl"], math.inf, False, "perplexity"))
    for bits, limit in sorted(thresholds.max_ratio_to_fp.items()):
        row = _budget(validation, bits)
        ratio = row["ppl"] / fp if row is not None else math.inf
        checks.append(
            GateCheck(
                name=f"ppl/fp@{bits:g}",
                value=ratio,
                limit=limit,
                passed=math.isfinite(ratio) and ratio <= limit,
                detail="not measured" if row is None else f"ppl {row['ppl']:.3f} against full precision {fp:.3f}",
            )
        )
    for bits, minimums in sorted(thresholds.min_task_score.items()):
        row = next((r for r in validation.get("tasks", []) if math.isclose(r["target"], bits)), None)
        for metric, minimum in sorted(minimums.items()):
            score = row["tasks"].get(metric) if row is not None else None
            checks.append(
                GateCheck(
                    name=f"{metric}@{bits:g}",
                    value=-math.inf if score is None else score,
                    limit=minimum,
                    passed=score is not None and score >= minimum,
                    detail="not measured" if score is None else f"routed at {row['avg_bits']:.3f} bits",
                )
            )
    if thresholds.routed_not_worse_than_rtn:
        rtn = {float(r["bits"]): r["ppl"] for r in validation.get("rtn", [])}
        checked = None if thresholds.rtn_check_bits is None else {float(b) for b in thresholds.rtn_check_bits}
        for row in validation["budgets"]:
            reference = rtn.get(float(row["target_bits"]))
            if reference is None or (checked is not None and float(row["target_bits"]) not in checked):
                continue
            ratio = row["ppl"] / reference
            checks.append(
                GateCheck(
                    name=f"routed/rtn@{row['target_bits']:g}",
                    value=ratio,
                    limit=thresholds.rtn_tolerance,
                    passed=math.isfinite(ratio) and ratio <= thresholds.rtn_tolerance,
                    detail=f"routed ppl {row['ppl']:.3f} against RTN {reference:.3f}",
                )
            )
    return checks


def gate_passed(checks: list[GateCheck]) -> bool:
    return bool(checks) and all(check.passed for check in checks)


def failure_message(checks: list[GateCheck]) -> str:
    failed = [f"{c.name} = {c.value:.4g} (limit {c.limit:.4g}; {c.detail})" for c in checks if not c.passed]
    return "quality gate failed: " + "; ".join(failed) if failed else "quality gate passed"
