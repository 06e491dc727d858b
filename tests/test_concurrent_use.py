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

import pytest
import torch

import mobiquant.layers as layers_module
import mobiquant.precision as precision_module
from mobiquant.checkpoint import mobi_layers
from mobiquant.layers import BitMeter, MoBiLinear
from mobiquant.precision import hold_budget, set_precision, track_bits
from tests.tiny_models import SLICES, VOCAB, quantize_tiny, set_uniform, tiny_model

THREADS = 4
# What a precision change and a held budget's move run.
SETTING_WRITERS = (precision_module.set_precision, precision_module._read_tables, precision_module.BudgetHold._update,
                   precision_module.BudgetHold.release)


@pytest.fixture(autouse=True)
def one_torch_thread_each() -> Iterator[None]:
    """Each serving thread computes on one torch thread (the threads share the cores), and the tests after these keep
    torch's own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def spent_alone(model: torch.nn.Module, served: list[torch.Tensor]) -> tuple[float, float]:
    """Weighted slices and weighted tokens of each prompt of ``served`` run alone, one after another, from the
    layers' own routing: what a meter of ``model`` counts for them."""
    spent = [0.0, 0.0]

    def count(layer: MoBiLinear, args: tuple) -> None:
        slices, weights = layer.route(args[0]), layer.in_features * layer.out_features
        spent[0] += float(slices.sum()) * weights
        spent[1] += slices.numel() * weights

    handles = [layer.register_forward_pre_hook(count) for layer in mobi_layers(model).values()]
    with torch.no_grad():
        for ids in served:
            model(ids)
    for handle in handles:
        handle.remove()
    return spent[0], spent[1]


def test_a_meter_counts_exactly_the_passes_of_threads_sharing_a_model() -> None:
    model = served_model()
    served = prompts(4)
    rounds = 3
    alone = spent_alone(model, served)

    def serve(_index: int) -> None:
        with torch.no_grad():
            for _ in range(rounds):
                for ids in served:
                    model(ids)

    with track_bits(model) as meter, switching_inside(BitMeter.add):
        run_in_threads(serve)
    # Whole numbers of slices times whole layer sizes: the sums are exact in any order.
    assert meter.weighted_tokens == THREADS * rounds * alone[1]
    assert meter.weighted_slices == THREADS * rounds * alone[0]


def test_blocks_opened_and_closed_by_threads_at_once_each_count_every_pass_inside_them() -> None:
    model = served_model()
    served = prompts(THREADS)
    # In each round every thread's block is open while every thread runs its prompt: each block counts them all.
    alone = spent_alone(model, served)
    rounds = 6
    all_open, all_ran = threading.Barrier(THREADS), threading.Barrier(THREADS)
    counted: list[tuple[float, float]] = []

    def serve(index: int) -> None:
        for _ in range(rounds):
            # A thread opens its next block while others may still be closing theirs.
            with track_bits(model) as meter:
                all_open.wait()
                with torch.no_grad():
                    model(served[index])
                all_ran.wait()
            counted.append((meter.weighted_slices, meter.weighted_tokens))

    with switching_inside(precision_module.track_bits.__wrapped__, BitMeter.add):
        run_in_threads(serve)
    assert counted == [alone] * (THREADS * rounds)
    assert all(not layer.bit_meters for layer in mobi_layers(model).values())


def test_a_held_budget_moves_once_per_pass_by_that_pass_alone_whichever_threads_run_them() -> None:
    """Every budget reads the same thresholds here, so every pass of one prompt spends the same bits and moves the
    budget by the same step: threads or not, the budget ends where as many passes run one by one take it."""
    threaded, reference = served_model(), served_model()
    for model in (threaded, reference):
        for layer in mobi_layers(model).values():
            layer.thresholds = torch.full_like(layer.thresholds, 1.5)
    ids = prompts(1)[0]
    passes_per_thread = 6
    # A long horizon keeps every step small: the budget stays inside its range, where steps add up exactly.
    held = hold_budget(threaded, 3.0, horizon_tokens=1000)
    reference_hold = hold_budget(reference, 3.0, horizon_tokens=1000)
    with torch.no_grad():
        for _ in range(THREADS * passes_per_thread):
            reference(ids)

    def serve(_index: int) -> None:
        with torch.no_grad():
            for _ in range(passes_per_thread):
                threaded(ids)

    with switching_inside(BitMeter.add, *SETTING_WRITERS):
        run_in_threads(serve)
    assert reference_hold.budget != 3.0
    assert held.budget == reference_hold.budget
    assert held.meter.weighted_tokens == reference_hold.meter.weighted_tokens
    assert held.meter.avg_bits == reference_hold.meter.avg_bits


def test_a_pass_ending_after_set_precision_released_its_hold_leaves_the_new_setting() -> None:
    """The hold moves the budget after each pass; set_precision releases it while a pass runs in another thread: the
    pass, ending after, must not write the hold's thresholds over the new setting."""
    model = served_model()
    layers = list(mobi_layers(model).values())
    ids = prompts(1)[0]
    at_end, set_anew = threading.Event(), threading.Event()
    test_thread = threading.current_thread()

    def pause_at_end(module: torch.nn.Module, args: tuple, output: object) -> None:
        if threading.current_thread() is not test_thread:
            at_end.set()
            set_anew.wait(timeout=30)

    # Registered before the hold's own hook: it runs first, and torch runs the hold's after it even once removed.
    handle = model.register_forward_hook(pause_at_end)
    hold_budget(model, 3.0, horizon_tokens=8)

    def serve(_index: int) -> None:
        with torch.no_grad():
            model(ids)

    with threads_running(serve, count=1):
        assert at_end.wait(timeout=30)
        set_precision(model, slices=2)
        set_anew.set()
    handle.remove()
    assert [layer.uniform_slices for layer in layers] == [2] * len(layers)
    assert all(not layer.bit_meters for layer in layers)


def test_set_precision_called_by_two_threads_at_once_leaves_every_layer_at_one_setting() -> None:
    model = served_model()
    layers = list(mobi_layers(model).values())
    settings = []

    def set_slices(index: int) -> None:
        set_precision(model, slices=1 + index)

    with switching_inside(*SETTING_WRITERS):
        for _ in range(10):
            run_in_threads(set_slices, count=2)
            settings.append({layer.uniform_slices for layer in layers})
    assert all(len(setting) == 1 for setting in settings), settings


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


def test_a_pass_under_way_when_its_block_closes_leaves_nothing_in_its_thread() -> None:
    """A block closed in another thread takes its hooks off while this thread's pass runs: the pass's end hook never
    runs, and the entry its begin hook made (its mask, its call's arguments) must not stay in the thread for good."""
    model = served_model()
    ids = prompts(1)[0]
    opened, paused, closed = threading.Event(), threading.Event(), threading.Event()
    left_in_thread: list[list] = []

    def pause_once(module: torch.nn.Module, args: tuple) -> None:
        if not paused.is_set():
            paused.set()
            closed.wait(timeout=30)

    handle = model.model.layers[0].register_forward_pre_hook(pause_once)

    def serve(_index: int) -> None:
        assert opened.wait(timeout=30)
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids))
            with track_bits(model):
                model(ids)
        left_in_thread.append(list(layers_module.pass_stack()))

    with threads_running(serve, count=1):
        with track_bits(model):
            opened.set()
            assert paused.wait(timeout=30)
        closed.set()
    handle.remove()
    assert left_in_thread == [[]]
