"""Perplexity against hand computations, RTN against a float64 reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from mobiquant.arch import architecture_for
from mobiquant.evaluation import EvaluationError, perplexity, rtn_model, rtn_quantize


class BigramModel(nn.Module):
    """Logits of each position depend on its own token only: the NLL is computable by hand from the table."""

    def __init__(self, vocab: int, context: int | None = None, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=generator, dtype=torch.float64))
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.window_lengths: list[int] = []
        self.grad_enabled: list[bool] = []

    def forward(self, input_ids: torch.Tensor, use_cache: bool = True) -> SimpleNamespace:
        assert use_cache is False
        self.window_lengths.append(input_ids.shape[1])
        self.grad_enabled.append(torch.is_grad_enabled())
        return SimpleNamespace(logits=self.table[input_ids])


def bigram_nll(table: torch.Tensor, prev: int, nxt: int) -> float:
    row = [float(v) for v in table[prev]]
    return math.log(sum(math.exp(v) for v in row)) - row[nxt]


def hand_perplexity(table: torch.Tensor, tokens: list[int], seqlen: int, windows: int) -> float:
    nlls = [
        bigram_nll(table, tokens[w * seqlen + j - 1], tokens[w * seqlen + j])
        for w in range(windows)
        for j in range(1, seqlen)
    ]
    return math.exp(sum(nlls) / len(nlls))


def test_perplexity_matches_hand_computation_and_drops_partial_window() -> None:
    model = BigramModel(vocab=11)
    tokens = torch.randint(0, 11, (1, 103), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, tokens, seqlen=10, progress=False)
    assert model.window_lengths == [10] * 10
    expected = hand_perplexity(model.table.detach(), tokens[0].tolist(), 10, 10)
    assert result == pytest.approx(expected, rel=1e-12)
    assert model.grad_enabled == [False] * 10


def test_perplexity_max_windows_and_flat_tokens() -> None:
    model = BigramModel(vocab=7)
    tokens = torch.randint(0, 7, (60,), generator=torch.Generator().manual_seed(2))
    result = perplexity(model, tokens, seqlen=12, max_windows=3, progress=False)
    assert model.window_lengths == [12] * 3
    assert result == pytest.approx(hand_perplexity(model.table.detach(), tokens.tolist(), 12, 3), rel=1e-12)
    assert perplexity(model, tokens.unsqueeze(0), seqlen=12, max_windows=3, progress=False) == result


def test_perplexity_uses_the_model_context_when_shorter() -> None:
    model = BigramModel(vocab=5, context=8)
    tokens = torch.randint(0, 5, (1, 40), generator=torch.Generator().manual_seed(3))
    result = perplexity(model, tokens, seqlen=2048, progress=False)
    assert model.window_lengths == [8] * 5
    assert result == pytest.approx(hand_perplexity(model.table.detach(), tokens[0].tolist(), 8, 5), rel=1e-12)


def test_uniform_prediction_gives_vocabulary_size() -> None:
    model = BigramModel(vocab=13)
    with torch.no_grad():
        model.table.zero_()
    tokens = torch.randint(0, 13, (1, 50), generator=torch.Generator().manual_seed(4))
    assert perplexity(model, tokens, seqlen=16, progress=False) == pytest.approx(13.0, rel=1e-12)


def test_perplexity_errors() -> None:
    model = BigramModel(vocab=5)
    with pytest.raises(EvaluationError, match="fewer than one window"):
        perplexity(model, torch.zeros(1, 9, dtype=torch.long), seqlen=10, progress=False)
    with pytest.raises(EvaluationError, match="shape"):
        perplexity(model, torch.zeros(2, 20, dtype=torch.long), seqlen=10, progress=False)
    with pytest.raises(EvaluationError, match="max_windows"):
        perplexity(model, torch.zeros(1, 20, dtype=torch.long), seqlen=10, max_windows=0, progress=False)
    with pytest.raises(EvaluationError, match="at least 2"):
        perplexity(model, torch.zeros(1, 20, dtype=torch.long), seqlen=1, progress=False)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_perplexity_on_tiny_llama_matches_float64_hand_computation(capsys: pytest.CaptureFixture) -> None:
    model = tiny_llama().double().train()
    tokens = torch.randint(0, 48, (1, 100), generator=torch.Generator().manual_seed(5))
    result = perplexity(model, tokens, seqlen=32, progress=True)
    assert model.training, "the model's mode is restored"
    assert "perplexity" in capsys.readouterr().err
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = tokens[:, w * 32 : (w + 1) * 32]
            logits = model(window).logits[0].double()
            probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
            for j in range(1, 32):
                nll -= math.log(float(probs[j - 1, window[0, j]]))
                count += 1
    assert result == pytest.approx(math.exp(nll / count), rel=1e-9)


def reference_rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Min-max asymmetric RTN written element by element in Python floats (float64)."""
    qmax = 2**bits - 1
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for start in range(0, cols, group):
            values = [float(v) for v in weight[r, start : start + group]]
            lo, hi = min(values), max(values)
            scale = (hi - lo) / qmax
            zero = round(-lo / scale)
            for j, v in enumerate(values):
                q = min(max(round(v / scale) + zero, 0), qmax)
                out[r, start + j] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_matches_float64_reference(bits: int) -> None:
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    weight[1] *= 30.0
    weight[2] += 0.5
    result = rtn_quantize(weight, bits, 16)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, reference_rtn(weight, bits, 16), rtol=0, atol=1e-12)
    as_float = rtn_quantize(weight.float(), bits, 16)
    assert as_float.dtype == torch.float32
    torch.testing.assert_close(as_float.double(), reference_rtn(weight.float(), bits, 16), rtol=1e-6, atol=1e-6)


def test_rtn_grid_and_error_bound() -> None:
    bits, group = 3, 32
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(9))
    result = rtn_quantize(weight, bits, group)
    grouped_w = weight.reshape(8, 4, group)
    grouped_q = result.reshape(8, 4, group)
    step = (grouped_w.amax(-1) - grouped_w.amin(-1)) / (2**bits - 1)
    assert ((grouped_q - grouped_w).abs().amax(-1) <= step / 2 + 1e-6).all()
    for r in range(8):
        for g in range(4):
            assert grouped_q[r, g].unique().numel() <= 2**bits


def test_rtn_constant_groups_and_per_row() -> None:
    weight = torch.tensor([[0.3] * 32 + [0.0] * 32, [-2.5] * 32 + list(range(32))], dtype=torch.float32)
    result = rtn_quantize(weight, 2, 32)
    assert torch.equal(result[:, :32], weight[:, :32])
    assert torch.equal(result[0, 32:], weight[0, 32:])
    per_row = rtn_quantize(weight, 4, None)
    torch.testing.assert_close(per_row.double(), reference_rtn(weight, 4, 64), rtol=1e-6, atol=1e-6)


def test_rtn_errors() -> None:
    with pytest.raises(EvaluationError, match="does not divide"):
        rtn_quantize(torch.randn(4, 96), 4, 64)
    with pytest.raises(EvaluationError, match="bits"):
        rtn_quantize(torch.randn(4, 64), 0, 64)
    with pytest.raises(EvaluationError, match="2-D"):
        rtn_quantize(torch.randn(64), 4, 64)


def test_rtn_model_replaces_only_quantized_linears() -> None:
    model = tiny_llama(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arch = architecture_for(model.config.model_type)
    quantized = rtn_model(model, arch, bits=3, group_size=32)
    after = quantized.state_dict()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model is untouched"
    changed = set()
    for index, block in enumerate(arch.block_list(model)):
        for name, linear in arch.quantized_linears(block).items():
            key = f"{arch.block_prefix(index)}{name}.weight"
            assert torch.equal(after[key], rtn_quantize(linear.weight.detach(), 3, 32))
            changed.add(key)
    assert len(changed) == 2 * len(arch.linears)
    for key, value in after.items():
        if key not in changed:
            assert torch.equal(value, before[key]), key


def test_rtn_model_on_opt_runs() -> None:
    torch.manual_seed(2)
    config = OPTConfig(
        vocab_size=40, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=32,
    )  # fmt: skip
    model = OPTForCausalLM(config).eval()
    tokens = torch.randint(0, 40, (1, 64), generator=torch.Generator().manual_seed(0))
    full = perplexity(model, tokens, progress=False)
    low = perplexity(rtn_model(model, architecture_for("opt"), 2, 32), tokens, progress=False)
    high = perplexity(rtn_model(model, architecture_for("opt"), 8, 32), tokens, progress=False)
    assert math.isfinite(low) and abs(high - full) < abs(low - full) + 1e-9
