"""The compensated codes on a CUDA device: shared passes replayed from CUDA graphs against the CPU's codes.

Skipped without CUDA; ``scripts/gpu-check`` runs it. The CPU half of every comparison is checked against the
float64 OBQ reference in ``tests/test_gptq.py``.
"""

import threading

import pytest
import torch

from mobiquant.gptq import nested_codes_many
from mobiquant.slicing import slice_weight
from tests.test_gptq import GROUP, correlated_inputs, heavy_tailed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def problems(seed: int) -> dict[str, list]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    weights = [heavy_tailed(out, 160, generator) for out in (40, 16, 72)]
    hessians = []
    for _ in weights:
        x = correlated_inputs(300, 160, generator)
        hessians.append(x.T @ x)
    sliced = [slice_weight(w, GROUP, 4, clip=0.9) for w in weights]
    return {"weights": weights, "hessians": hessians, "scales": [s.scale for s in sliced],
            "zeros": [s.zero for s in sliced],
            "objectives": [{2: 2.0, 4: 24.0, 6: 32.0, 8: 8.0}, {2: 32.0, 4: 24.0, 6: 32.0, 8: 8.0},
                           {2: 1.0, 4: 1.0, 6: 1.0, 8: 8.0}]}


def codes_on(device: str, given: dict[str, list], cuda_graphs: bool) -> list[torch.Tensor]:
    moved = {key: [t.to(device) for t in given[key]] for key in ("weights", "hessians", "scales", "zeros")}
    chosen = nested_codes_many(moved["weights"], moved["hessians"], moved["scales"], moved["zeros"], 8,
                               given["objectives"], block_size=32, damp=0.05, cuda_graphs=cuda_graphs)
    return [codes.cpu() for codes, _ in chosen]


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return min(float((x == y).double().mean()) for x, y in zip(a, b, strict=True))


def test_graphed_passes_choose_the_eager_passes_codes_and_the_cpus() -> None:
    given = problems(0)
    graphed, eager = codes_on("cuda", given, True), codes_on("cuda", given, False)
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager, strict=True))
    # Another device's float64 rounding may flip a near tie; nothing more.
    assert agreement(graphed, codes_on("cpu", given, False)) > 0.999


def test_passes_captured_in_threads_beside_other_work() -> None:
    given = [problems(seed) for seed in (1, 2, 3)]
    expected = [codes_on("cuda", one, False) for one in given]
    results: dict[int, list[torch.Tensor]] = {}

    def run(index: int) -> None:
        results[index] = codes_on("cuda", given[index], True)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(given))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 1, 2]
    for index, codes in results.items():
        assert all(torch.equal(a, b) for a, b in zip(codes, expected[index], strict=True)), index
