"""CPU checks of bench/kernel_speed.py's code paths, so that its single GPU run does not fail on a logic error.

The end-to-end decode runs here on a tiny Llama with the PyTorch layer path; its timings mean nothing
and are not checked, only that every precision runs and the sliced model tracks the fp16 one.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from bench.kernel_speed import (
    E2E_WARMUP_TOKENS,
    PRECISIONS,
    cache_keyword,
    e2e_decode,
    greedy_decode,
    llama_shaped_model,
    target_summary,
)

# The bench's calls must run on the installed transformers without deprecated names (5.24 renames the KV cache's).
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
}


def test_e2e_decode_runs_fp16_and_every_precision() -> None:
    torch.manual_seed(0)
    results = e2e_decode(layers=2, new_tokens=3, dims=TINY_LLAMA, group_size=32, device="cpu")
    assert list(results) == ["fp16", *PRECISIONS]
    assert all(entry["tokens_per_s"] > 0 and entry["ms_per_token"] > 0 for entry in results.values())
    errors = [results[label]["logits_rel_err_vs_fp16"] for label in PRECISIONS]
    # More slices, closer to fp16: the timed model really is the sliced one, at the requested precision.
    assert errors[0] > errors[1] > errors[2] > 0
    assert errors[2] < 0.05


def row(tokens: int, slices: str, fraction: float, kernel_s: float, fp16_s: float) -> dict:
    return {"tokens": tokens, "slices": slices, "bandwidth_fraction": fraction, "kernel_s": kernel_s, "fp16_s": fp16_s}


def test_target_summary_takes_the_worst_shape() -> None:
    rows = [
        row(1, "1", 0.80, 1.0, 1.0),
        row(1, "1", 0.70, 1.0, 1.0),  # a second shape below the roofline target
        row(1, "2", 0.90, 1.0, 1.0),
        row(2048, "routed", 0.5, 1.1, 1.0),
        row(2048, "4", 0.5, 1.3, 1.0),
    ]
    summary = target_summary(rows)
    assert summary["decode T=1 k=1 copy-bandwidth fraction"] == {"worst": 0.70, "target": 0.75, "met": False}
    assert summary["decode T=1 k=2 copy-bandwidth fraction"]["met"]
    assert summary["prefill T=2048 k=routed time / fp16 cuBLAS"]["met"]
    assert not summary["prefill T=2048 k=4 time / fp16 cuBLAS"]["met"]
    assert len(summary) == 4


@torch.no_grad()
def test_static_cache_decode_generates_what_a_dynamic_cache_does() -> None:
    """The timed step (static cache, token and position read from device buffers, as captured in the CUDA
    graph) decodes the same greedy tokens as an ordinary dynamic-cache loop."""
    torch.manual_seed(1)
    model = llama_shaped_model(2, TINY_LLAMA, torch.device("cpu")).float()
    prompt = torch.randint(0, TINY_LLAMA["vocab_size"], (1, 8))
    steps = 5
    _, _, last = greedy_decode(model, prompt, steps, graphs=False)
    cache = DynamicCache(config=model.config)
    with_cache = {cache_keyword(model): cache}
    token = model(input_ids=prompt, **with_cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    generated = []
    for _ in range(E2E_WARMUP_TOKENS + steps):
        token = model(input_ids=token, **with_cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(token))
    # The cache was used under the name given (another name would leave it empty, each step without its past).
    assert cache.get_seq_length() == prompt.shape[1] + E2E_WARMUP_TOKENS + steps
    assert len(set(generated)) > 1  # a model that repeats one token would not show a wrong position
    assert int(last) == generated[-1]


def test_the_cache_keyword_follows_the_forward_signature() -> None:
    """``cache`` where the forward names it (transformers 5.24), ``past_key_values`` where it does not (the GPU
    image's 5.17), where ``cache`` would be swallowed by ``**kwargs`` and the cache never filled."""

    class Before524(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None, **kwargs: object) -> None:
            return None

    assert cache_keyword(Before524()) == "past_key_values"
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.24"):
        assert cache_keyword(llama_shaped_model(1, TINY_LLAMA, torch.device("cpu"))) == "cache"
