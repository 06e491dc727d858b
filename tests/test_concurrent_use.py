"""One loaded model serving several threads at once: meters, held budgets and precision changes stay whole.

CPython 3.11 switches threads only at calls and backward jumps, so a read-modify-write with neither in between (a
float ``+=`` on an attribute) happens never to be split there, while free-threaded builds split it anywhere. To find
such races on any interpreter, the tests make the threads switch between any two bytecodes of the code that reads or
writes what they share (``switching_inside``).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import torch

import mobiquant.precision as precision_module
from mobiquant.checkpoint import mobi_layers
from mobiquant.layers import MoBiLinear
from mobiquant.precision import set_precision
from tests.tiny_models import SLICES, VOCAB, quantize_tiny, set_uniform, tiny_model

THREADS = 4
# What a precision change and a held budget's move run.
SETTING_WRITERS = (precision_module.set_precision, precision_module._read_tables, precision_module.BudgetHold._update,
                   precision_module.BudgetHold.release)


@contextlib.contextmanager
def switching_inside(*functions: Callable) -> Iterator[None]:
    """Inside, this thread and the threads started here hand the interpreter to any thread ready to run between every
    two bytecodes of ``functions``: a race there shows at once instead of once in a long while."""
    codes = {function.__code__ for function in functions}

    def per_opcode(frame: FrameType, event: str, arg: object) -> Callable | None:
        if event == "opcode":
            time.sleep(0)  # releases the GIL: a waiting thread takes it here
        return per_opcode

    def on_call(frame: FrameType, event: str, arg: object) -> Callable | None:
        if frame.f_code not in codes:
            return None
        frame.f_trace_opcodes = True
        return per_opcode

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threading.settrace(on_call)
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(None)
        threading.settrace(None)
        sys.setswitchinterval(interval)


@contextlib.contextmanager
def threads_running(work: Callable[[int], None], count: int = THREADS) -> Iterator[list[BaseException]]:
    """``work(index)`` in ``count`` threads, started on entry and joined on exit; an error in any of them fails the
    test. Gives the list of their errors so far."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as error:  # noqa: BLE001 - raised again in the test's own thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield errors
    finally:
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]


def run_in_threads(work: Callable[[int], None], count: int = THREADS) -> None:
    with threads_running(work, count):
        pass


def served_model(seed: int = 5) -> torch.nn.Module:
    model = quantize_tiny(tiny_model("llama", seed=seed), seed=seed)
    set_uniform(model, None, threshold=1.5)
    return model


def prompts(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, 3 + index % 4), generator=generator) for index in range(count)]


class SliceRecorder:
    """A layer meter recording the slices per token of every layer run."""

    def __init__(self) -> None:
        self.per_token: set[float] = set()
        self._lock = threading.Lock()

    def add(self, slice_sum: float, tokens: int, layer_params: int) -> None:
        with self._lock:
            self.per_token.add(slice_sum / tokens)


def test_a_layer_runs_at_the_old_or_the_new_setting_while_set_precision_changes_it() -> None:
    """One slice for every token, or a routed budget whose thresholds all give two: a layer that reads its setting as
    it changes runs one or the other, never a third."""
    torch.set_num_threads(1)
    model = served_model()
    layers = list(mobi_layers(model).values())
    for layer in layers:
        layer.thresholds = torch.full_like(layer.thresholds, float(SLICES - 2))
    served = prompts(THREADS)
    set_precision(model, slices=1)
    recorder = SliceRecorder()
    for layer in layers:
        layer.bit_meters = [*layer.bit_meters, recorder]
    stop = threading.Event()

    def serve(index: int) -> None:
        with torch.no_grad():
            while not stop.is_set():
                model(served[index])

    with switching_inside(MoBiLinear.route, *SETTING_WRITERS), threads_running(serve):
        try:
            for _ in range(40):
                set_precision(model, slices=1)
                set_precision(model, avg_bits=3.0)
        finally:
            stop.set()
    for layer in layers:
        layer.bit_meters = [meter for meter in layer.bit_meters if meter is not recorder]
    assert recorder.per_token <= {1.0, 2.0}
