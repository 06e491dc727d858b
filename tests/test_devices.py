"""Device choice and one GPU per block task, checked on the CPU (the assignment logic needs no GPU)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from flows.compress import block_task_devices, dask_cluster_for
from flows.params import parse_params
from mobiquant import devices
from mobiquant.devices import DeviceError, block_devices, lease_device, physical_gpu, resolve_device


def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device '{spec}': this torch .* is built without CUDA") as error:
            resolve_device(spec)
        assert "\n" not in str(error.value)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(DeviceError, match="device 'cuda': 0 CUDA device"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="not a torch device"):
        resolve_device("tpu0")
    with pytest.raises(DeviceError, match="unsupported device"):
        resolve_device("mps")


def test_cuda_index_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_block_devices_give_each_worker_its_own_gpu() -> None:
    assert block_devices(torch.device("cpu"), 3) == ["cpu", "cpu", "cpu"]
    assert block_devices(torch.device("cuda"), 3, visible_gpus=4) == ["cuda:0", "cuda:1", "cuda:2"]
    assert block_devices(torch.device("cuda:2"), 3, visible_gpus=4) == ["cuda:2"]
    with pytest.raises(DeviceError, match="3 workers asked for, but 2 CUDA"):
        block_devices(torch.device("cuda"), 3, visible_gpus=2)


def test_leases_never_put_two_blocks_on_one_gpu(tmp_path: Path) -> None:
    held: list[str] = []
    peak: list[int] = []
    lock = threading.Lock()

    def block_task() -> None:
        with lease_device(["cuda:0", "cuda:1"], tmp_path, poll_seconds=0.01) as device:
            with lock:
                assert device not in held, f"{device} leased twice"
                held.append(device)
                peak.append(len(held))
            time.sleep(0.05)
            with lock:
                held.remove(device)

    threads = [threading.Thread(target=block_task) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(peak) == 2, "both GPUs were used at once, never more"
    with lease_device(["cpu", "cpu"], tmp_path) as device:
        assert device == "cpu"


def test_leases_follow_the_physical_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert physical_gpu("cuda:0") == "3" and physical_gpu("cuda:1") == "5" and physical_gpu("cuda") == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert physical_gpu("cuda:1") == "1"


def test_set_threads_defaults_to_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert devices.available_threads() == len(__import__("os").sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert devices.set_threads(None) == devices.available_threads() == torch.get_num_threads()
        assert devices.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _params(tmp_path: Path, **values: object) -> object:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return parse_params({"model": str(model), **values})


def test_pipeline_assigns_one_gpu_per_block_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert block_task_devices(_params(tmp_path, runner="thread", workers=2)) == ["cuda:0", "cuda:1"]
    assert block_task_devices(_params(tmp_path, runner="process", workers=2, device="cuda")) == ["cuda:0", "cuda:1"]
    # Dask workers each see one GPU: the task resolves the device on its worker.
    assert block_task_devices(_params(tmp_path, runner="dask", workers=2)) == ["auto"]
    spec = dask_cluster_for(_params(tmp_path, runner="dask", workers=2))
    if spec["cluster_class"] == "distributed.SpecCluster":
        workers = spec["cluster_kwargs"]["workers"]
        assert [w["options"]["env"]["CUDA_VISIBLE_DEVICES"] for w in workers.values()] == ["0", "1"]
        assert all(w["options"]["nthreads"] == 1 for w in workers.values())
    else:
        assert spec["cluster_kwargs"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = dask_cluster_for(_params(tmp_path, runner="dask", workers=2))
    assert cpu["cluster_class"] == "distributed.LocalCluster" and cpu["cluster_kwargs"]["n_workers"] == 2
    assert block_task_devices(_params(tmp_path, runner="thread", workers=2)) == ["cpu", "cpu"]


def test_gpu_worker_specs_start_a_real_cluster_with_one_gpu_each() -> None:
    from distributed import Client, SpecCluster

    spec = devices.dask_gpu_workers([0, 1])
    cluster = SpecCluster(workers=spec, scheduler={"cls": "distributed.Scheduler",
                                                   "options": {"dashboard_address": ":0"}})
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
    finally:
        cluster.close()
