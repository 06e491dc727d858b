"""Where work runs: the device a user names, CPU threads, and one GPU per concurrent block task.

A block task takes a *lease* on one device from a list (``cuda:0`` ... ``cuda:N-1``): an exclusive ``flock`` on a
lock file per device, so threads of one process and separate processes share the GPUs without two blocks on
one GPU. Dask workers each see one GPU through their own ``CUDA_VISIBLE_DEVICES`` and need no lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


class DeviceError(ValueError):
    """A device that this machine or this torch build does not have."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"device {device!r}: {reason}")
        self.device, self.reason = device, reason


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked to exist."""
    text = "auto" if spec is None else str(spec)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise DeviceError(text, "not a torch device (use auto, cpu, cuda or cuda:N)") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(text, "unsupported device (use auto, cpu, cuda or cuda:N)")
    if torch.version.cuda is None:
        raise DeviceError(text, f"this torch {torch.__version__} is built without CUDA (CPU only)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (device.index or 0) >= count:
        raise DeviceError(text, f"{count} CUDA device(s) visible")
    return device


def check_bf16_products(device: torch.device, setting: str) -> None:
    """Refuse ``setting`` (bf16 matrix products) on a CPU without bf16 instructions (AVX-512 or AMX), where
    torch runs them in a reference kernel on one thread, many times slower than float32 (``docs/method.md``): a
    choice made to go faster must not make a long calibration slower. GPUs and bf16 CPUs pass."""
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError(f"{setting} needs a GPU or a CPU with bf16 instructions (AVX-512 or AMX); this CPU "
                         f"({torch.backends.cpu.get_cpu_capability()}) runs bf16 matrix products many times slower "
                         "than float32: use float32")


def available_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else the cores this process may run on (its CPU affinity).

    Threads beyond the cores actually free oversubscribe them, which costs far more than the threads gain
    (docs/scale.md has a measurement); ``OMP_NUM_THREADS`` is how a user shares the cores with other work.
    """
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: :func:`available_threads`); returns the number set."""
    count = threads or available_threads()
    if count < 1:
        raise ValueError(f"threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count


def block_devices(device: torch.device, workers: int, visible_gpus: int | None = None) -> list[str]:
    """The devices concurrent block tasks lease from: one GPU each on CUDA, the CPU for every worker otherwise.

    ``cuda`` (no index) with ``workers=N`` spreads the blocks over ``cuda:0..N-1``; ``cuda:K`` pins them all to
    GPU ``K``; asking for more workers than visible GPUs is an error rather than two blocks sharing one GPU.
    """
    if device.type != "cuda":
        return ["cpu"] * workers
    if device.index is not None:
        return [f"cuda:{device.index}"]
    gpus = torch.cuda.device_count() if visible_gpus is None else visible_gpus
    if workers > gpus:
        raise DeviceError("cuda", f"{workers} workers asked for, but {gpus} CUDA device(s) visible: one GPU per worker")
    return [f"cuda:{i}" for i in range(workers)]


def physical_gpu(device: str) -> str:
    """The GPU behind ``cuda:N`` as this machine numbers it (``CUDA_VISIBLE_DEVICES`` renumbers from 0).

    Leases are taken on physical GPUs, so workers that each see "their" GPU as ``cuda:0`` do not block each other.
    """
    index = torch.device(device).index or 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


@contextlib.contextmanager
def lease_device(devices: Sequence[str], lock_dir: Path, poll_seconds: float = 0.2) -> Iterator[str]:
    """Hold one of ``devices`` exclusively for the duration of the block (waits until one is free).

    The CPU is not leased: every worker may compute on it (each with its own thread share).
    """
    if all(d == "cpu" for d in devices):
        yield "cpu"
        return
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for device in dict.fromkeys(devices):
            lock_name = f"gpu-{physical_gpu(device)}.lock"
            handle = open(lock_dir / lock_name, "a")  # noqa: SIM115 (held for the lease)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield device
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_seconds)


def dask_gpu_workers(gpus: Sequence[int]) -> dict[str, dict]:
    """Worker specs for ``distributed.SpecCluster``: one single-threaded worker process per GPU, each seeing only it.

    Used where dask-cuda's ``LocalCUDACluster`` (which does the same) is not installed.
    """
    return {
        f"gpu-{gpu}": {
            "cls": "distributed.Nanny",
            "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(gpu)}},
        }
        for gpu in gpus
    }
