"""The compress flow end to end on a tiny random Mixtral, on Prefect's ephemeral server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect import get_client
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mobiquant
from flows.compress import compress
from mobiquant.arch import summarize_linears
from mobiquant.checkpoint import mobi_layers
from tests.pipeline.conftest import tiny_params
from tests.pipeline.tiny import build_tiny_llama

EXPERTS = 4
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FOLDED = f"mlp.experts.<0-{EXPERTS - 1}>.gate_proj/up_proj/down_proj"


def test_compress_quantizes_every_expert_of_a_mixtral_and_a_rerun_reuses_its_blocks(
    tmp_path: Path, prefect_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Released layout (block_sparse_moe.experts.<e>.w1/w2/w3), read as mlp.experts.<e>.gate_proj/down_proj/up_proj.
    # One expert per token and 32 calibration tokens: this seed's routing leaves an expert of block 1 unreached.
    source = build_tiny_llama(tmp_path / "tiny" / "tiny-mixtral", family="mixtral", num_local_experts=EXPERTS,
                              num_experts_per_tok=1)
    params = tiny_params(source, tmp_path, samples=2, seqlen=16)
    summary = compress(**params)
    assert summary["gate_passed"]

    staging = tmp_path / "published" / summary["repo_id"] / "staging"
    quantized = AutoModelForCausalLM.from_pretrained(staging).eval()
    expected = {f"model.layers.{b}.{name}" for b in range(2) for name in (
        *ATTENTION, *(f"mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in PROJECTIONS))}
    assert set(mobi_layers(quantized)) == expected

    # The independent reference: transformers' own Mixtral, stacked experts (gate_up_proj [E, 2I, H]) and all.
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    (samples,) = (tmp_path / "work" / "captures").rglob("samples.safetensors")
    with torch.no_grad():
        routing = reference(load_file(samples)["ids"], output_router_logits=True).router_logits
    unreached = [sorted(set(range(EXPERTS)) - set(logits.argmax(dim=-1).tolist())) for logits in routing]
    assert any(unreached)
    for block, layer in enumerate(reference.model.layers):
        gate, up = layer.mlp.experts.gate_up_proj.detach().chunk(2, dim=1)
        stacked = {"gate_proj": gate, "up_proj": up, "down_proj": layer.mlp.experts.down_proj.detach()}
        for e in range(EXPERTS):
            for projection, weights in stacked.items():
                linear = mobi_layers(quantized)[f"model.layers.{block}.mlp.experts.{e}.{projection}"]
                error = linear.dense_weight(4, torch.float32) - weights[e]
                # 8 bits leave 4-10% here (the clipping weighs the low precisions, the codes answer an expert's few
                # tokens); another expert's or the other projection's weights are as far as two random matrices
                # (141%).
                assert error.norm() < 0.3 * weights[e].norm(), (block, e, projection)
    ids = torch.randint(3, 30, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = reference(ids).logits
        errors = {}
        for slices in (1, 4):
            mobiquant.set_precision(quantized, slices=slices)
            errors[slices] = float((quantized(ids).logits - expected_logits).norm() / expected_logits.norm())
    assert errors[4] < 0.1 and errors[4] < errors[1]

    client = MlflowClient(params["mlflow_uri"])
    version = client.get_model_version_by_alias(summary["registered_model"], "candidate")
    assert version.tags["quantized_linears"] == ",".join((*ATTENTION, FOLDED))
    run = client.get_run(version.run_id)
    assert run.data.tags["quantized_linears"] == version.tags["quantized_linears"]
    # The experts' GPTQ curves are folded per projection (tests/pipeline/test_tracking_and_card.py checks the values).
    assert {"loss_block_001_gptq mlp.experts.down_proj mean", "loss_block_001_gptq mlp.experts.down_proj max",
            "loss_block_001_gptq self_attn.o_proj"} <= set(run.data.metrics)
    assert not any(".experts.3." in name for name in run.data.metrics)
    card = (staging / "README.md").read_text()
    per_block = "; ".join(f"block {b}: " + ", ".join(summarize_linears(f"mlp.experts.{e}.{p}" for e in experts
                                                                       for p in PROJECTIONS))
                          for b, experts in enumerate(unreached) if experts)
    unreached_line = f"**no calibration token reached (codes from the weights alone, constant routers)**: {per_block}\n"
    assert unreached_line in Path(summary["report"]).read_text()
    # The library's own warning, logged in the block's task run, is in that task run's log on the Prefect API.
    library_warnings = [log for log in asyncio.run(_api_logs()) if log.name == "mobiquant.calibration.block"]
    assert any(log.task_run_id and "no calibration token reached mlp.experts." in log.message
               for log in library_warnings), library_warnings
    assert f"`self_attn.o_proj`, `{FOLDED}`;" in card and "mlp.experts.0.gate_proj" not in card

    # A re-run computes nothing again: the capture, every block, the checkpoint and the measurements are reused.
    for name in ("mobiquant.calibration.capture.capture_token_saliency", "mobiquant.calibration.driver.calibrate_block",
                 "mobiquant.calibration.finished_model", "mobiquant.evaluation.perplexity",
                 "mobiquant.evaluation.streamed_perplexities"):
        monkeypatch.setattr(name, _must_not_run)
    again = compress(**params)
    assert again["checkpoint"] == summary["checkpoint"] and again["staged_commit"] == summary["staged_commit"]
    assert unreached_line in Path(again["report"]).read_text()


async def _api_logs() -> list:
    async with get_client() as client:
        return await client.read_logs()


def _must_not_run(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("recomputed what an earlier run of the same inputs had finished")
