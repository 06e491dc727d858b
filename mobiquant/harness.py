"""Benchmarks of lm-eval-harness (its Python API) on a loaded MoBiQuant model, at each precision setting.

lm-eval's own command line cannot load a MoBiQuant checkpoint: it reads the quantization config before anything
imports mobiquant. Here the model is loaded once, wrapped in lm-eval's ``HFLM``, and the tasks run once per
setting, with the bits the tokens actually used measured alongside.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Sequence
from typing import Any

from mobiquant import INSTALL_HINT

# The optional extra that installs the harness.
EXTRA = "eval"


class HarnessError(ValueError):
    """Tasks that cannot be run as asked (lm-eval missing, unknown task names)."""


def task_manager(include_path: str | os.PathLike | None = None) -> Any:
    """lm-eval's task index: its own tasks plus the task YAMLs under ``include_path``."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise HarnessError(
            f"benchmark tasks need lm-eval-harness, which is not installed: {INSTALL_HINT} "
            f"with the [{EXTRA}] extra (`pip install '.[{EXTRA}]'`)"
        ) from error
    return TaskManager(include_path=os.fspath(include_path) if include_path is not None else None)


def check_tasks(manager: Any, tasks: Sequence[str]) -> None:
    """Refuse task names lm-eval does not know, naming the closest ones it does."""
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HarnessError(f"unknown lm-eval task {name!r}{hint}")


def task_metrics(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, float]:
    """``{"task metric": value}`` for every metric lm-eval reports on the named tasks (groups included)."""
    scores: dict[str, float] = {}
    for name in tasks:
        entry = results.get("results", {}).get(name) or results.get("groups", {}).get(name) or {}
        for key, value in entry.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or not isinstance(value, int | float):
                continue
            label = metric if filter_name == "none" else f"{metric} ({filter_name})"
            scores[f"{name} {label}"] = float(value)
    return scores


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    manager: Any,
    tasks: Sequence[str],
    settings: Sequence[tuple[str, float, dict[str, Any]]],
    limit: int | None = None,
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Run ``tasks`` once per precision setting; one row per setting with its measured bits and task metrics.

    ``settings`` holds ``(mode, target, set_precision keyword arguments)``. ``limit`` keeps the first documents
    of each task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from mobiquant.precision import set_precision, track_bits

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    rows = []
    for mode, target, kwargs in settings:
        set_precision(model, **kwargs)
        # The harness prints notes on stdout, where `mobiquant eval --json` writes its report. No bootstrap: the
        # table shows no standard errors, and a perplexity metric would be resampled 100,000 times per setting.
        with track_bits(model) as meter, contextlib.redirect_stdout(sys.stderr):
            results = simple_evaluate(
                model=wrapped,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=0,
            )
        rows.append({"mode": mode, "target": target, "avg_bits": meter.avg_bits, "tasks": task_metrics(results, tasks)})
    return rows
