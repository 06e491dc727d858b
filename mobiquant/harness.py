"""Benchmarks of lm-eval-harness (its Python API) on a loaded MoBiQuant model, at each precision setting.

lm-eval's own command line cannot load a MoBiQuant checkpoint: it reads the quantization config before anything
imports mobiquant. Here the model is loaded once, wrapped in lm-eval's ``HFLM``, and the tasks run once per
setting, with the bits the tokens actually used measured alongside.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
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

    wrapped = padding_metered(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    rows = []
    for mode, target, kwargs in settings:
        set_precision(model, **kwargs)
        # The harness prints notes on stdout, where `mobiquant eval --json` writes its report. No bootstrap: the
        # table shows no standard errors, and a perplexity metric would be resampled 100,000 times per setting.
        with track_bits(model) as meter, contextlib.redirect_stdout(sys.stderr), recording_right_padding(wrapped):
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


def padding_metered(hflm: type) -> type:
    """lm-eval's ``HFLM`` (``hflm``) whose right-padded likelihood batches are metered without their padding.

    lm-eval right-pads the likelihood requests of a batch to one length (``pad_and_concat``) and calls the model
    with no attention mask: a causal model needs none for right padding, but the bit meters (``track_bits``) would
    count the padding tokens. The batch's mask, recorded as lm-eval pads it (``recording_right_padding``), is
    declared to the meters (``mobiquant.precision.declare_padding``); the model still runs as lm-eval calls it, so
    the scores do not change.
    """

    class PaddingMeteredHFLM(hflm):
        _right_padded: tuple[Any, Any] | None = None
        padding_module = hflm.__module__  # where lm-eval's HFLM looks up pad_and_concat

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            from mobiquant.precision import declare_padding

            padded, self._right_padded = self._right_padded, None
            if attn_mask is None and labels is None and padded is not None and padded[0] is inps:
                with declare_padding(self.model, padded[1]):
                    return super()._model_call(inps)
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    PaddingMeteredHFLM.__name__ = PaddingMeteredHFLM.__qualname__ = f"PaddingMetered{hflm.__name__}"
    return PaddingMeteredHFLM


# lm-eval's modules whose pad_and_concat is wrapped: their own function and how many recording blocks, in any
# thread, are open. The wrapper records into the innermost recording HFLM of the thread that pads, so evaluations
# running at once in several threads each record their own batches, and the last to end restores lm-eval's own.
_PADDING_LOCK = threading.Lock()
_WRAPPED_PADDING: dict[str, tuple[Callable[..., Any], int]] = {}
_RECORDING = threading.local()


@contextlib.contextmanager
def recording_right_padding(wrapped: Any) -> Iterator[None]:
    """Inside the block, each batch lm-eval's ``HFLM`` right-pads (``pad_and_concat`` of its module) in this thread
    is recorded on ``wrapped`` (a ``padding_metered`` HFLM) with its mask, 1 for each row's own tokens, for its next
    model call."""
    name = wrapped.padding_module
    module = sys.modules[name]
    with _PADDING_LOCK:
        if name in _WRAPPED_PADDING:
            original, users = _WRAPPED_PADDING[name]
            _WRAPPED_PADDING[name] = original, users + 1
        else:
            original = getattr(module, "pad_and_concat", None)
            if original is not None:
                module.pad_and_concat = functools.partial(_recorded_pad_and_concat, original)
                _WRAPPED_PADDING[name] = original, 1
    if original is None:  # an lm-eval that pads otherwise: nothing to record
        yield
        return
    recording = _RECORDING.__dict__.setdefault("stack", [])
    recording.append(wrapped)
    try:
        yield
    finally:
        recording.pop()
        wrapped._right_padded = None
        with _PADDING_LOCK:
            original, users = _WRAPPED_PADDING.pop(name)
            if users > 1:
                _WRAPPED_PADDING[name] = original, users - 1
            else:
                module.pad_and_concat = original


def _recorded_pad_and_concat(original: Callable[..., Any], max_length: int, tensors: list[Any],
                             padding_side: str = "right") -> Any:
    import torch

    lengths = [int(tensor.shape[-1]) for tensor in tensors]  # before padding: it replaces the list's tensors
    padded = original(max_length, tensors, padding_side=padding_side)
    recording = getattr(_RECORDING, "stack", None)
    if padding_side == "right" and recording:
        mask = (torch.arange(max_length) < torch.tensor(lengths)[:, None]).long()
        recording[-1]._right_padded = (padded, mask)
    return padded
