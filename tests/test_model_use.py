"""An elastic model used as any torch model: pickled, copied, compiled, fine-tuned around, fed padded batches."""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mobiquant.layers as layers_module
import mobiquant.precision as precision
from mobiquant.checkpoint import LOAD_GUARD, attach_quantizer, load_checkpoint, mobi_layers, save_checkpoint
from mobiquant.layers import BitMeter, MoBiLinear, PassMask
from mobiquant.precision import BudgetHold, declare_padding, hold_budget, set_precision, track_bits
from tests.tiny_models import VOCAB, logits, quantize_tiny, set_uniform, tiny_model


def saved_checkpoint(folder: Path, seed: int = 0) -> Path:
    return save_checkpoint(quantize_tiny(tiny_model("llama", seed=seed), seed=seed), folder)


def assert_copy_runs_and_saves_itself(model: torch.nn.Module, copy_of: Callable, folder: Path) -> None:
    """``copy_of(model)`` runs as ``model`` does, and its ``save_pretrained`` writes the copy, with the load guard."""
    twin = copy_of(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    for setting in (2, None):
        set_uniform(model, setting, threshold=1.4)
        set_uniform(twin, setting, threshold=1.4)
        assert torch.equal(logits(twin, ids), logits(model, ids)), setting
    # Changed in the copy only: what is written shows which model save_pretrained is bound to.
    name, layer = next(iter(mobi_layers(twin).items()))
    layer.scale = layer.scale * 2
    twin.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["transformers_weights"] == LOAD_GUARD
    assert torch.equal(load_file(folder / "model.safetensors")[f"{name}.scale"], layer.scale)


def pickled(model: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("copy_of", [pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_a_loaded_and_an_in_memory_model_survive_pickling_and_copying(tmp_path: Path, copy_of: Callable) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(saved_checkpoint(tmp_path / "ckpt", seed=1))
    assert_copy_runs_and_saves_itself(loaded, copy_of, tmp_path / "loaded")
    # What mobiquant.quantize returns (tests/test_api.py pickles one from quantize itself).
    in_memory = attach_quantizer(quantize_tiny(tiny_model("llama", seed=2), seed=2))
    assert_copy_runs_and_saves_itself(in_memory, copy_of, tmp_path / "in-memory")


def test_a_refused_precision_request_keeps_the_budget_hold() -> None:
    model = quantize_tiny(tiny_model("llama", seed=3), seed=3)
    hold = hold_budget(model, 3.0, horizon_tokens=8)
    ids = torch.randint(0, VOCAB, (1, 6))
    for request, error in [({"avg_bits": 9.0}, ValueError), ({"slices": 7}, ValueError),
                           ({"slices": 2.5}, TypeError), ({"avg_bits": "3"}, TypeError)]:
        with pytest.raises(error):
            set_precision(model, **request)
        counted = hold.meter.weighted_tokens
        with torch.no_grad():
            model(ids)
        assert hold.meter.weighted_tokens > counted, request
    set_precision(model, slices=2)
    counted = hold.meter.weighted_tokens
    with torch.no_grad():
        model(ids)
    assert hold.meter.weighted_tokens == counted


@pytest.mark.parametrize("copy_of", [pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_a_copy_made_while_a_budget_is_held_holds_it_on_its_own(copy_of: Callable) -> None:
    # The reference: a second model built the same way, holding the same budget and served what the copy is served.
    model, reference = (quantize_tiny(tiny_model("llama", seed=3), seed=3) for _ in range(2))
    held = hold_budget(model, 3.0, horizon_tokens=8)
    reference_hold = hold_budget(reference, 3.0, horizon_tokens=8)
    generator = torch.Generator().manual_seed(3)
    served = [torch.randint(0, VOCAB, (1, length), generator=generator) for length in (7, 5, 9, 6)]
    with track_bits(model):
        assert torch.equal(logits(model, served[0]), logits(reference, served[0]))
        twin = copy_of(model)
    budget = held.budget
    budgets = [reference_hold.budget]
    for ids in served[1:]:
        assert torch.equal(logits(twin, ids), logits(reference, ids))
        budgets.append(reference_hold.budget)
    # The budget moved, in the copy as in the reference, and the original's did not move with the copy's.
    assert len(set(budgets)) == len(budgets)
    assert held.budget == budget
    # The copy carries its own hold's meters, no tracking block's; releasing its hold leaves the original's.
    assert all(len(layer.bit_meters) == 2 for layer in mobi_layers(twin).values())
    set_precision(twin, slices=2)
    assert not any(layer.bit_meters for layer in mobi_layers(twin).values())
    # The tracking block's hooks the copy carries mark none of its passes: nothing of it is metered any more.
    marked = []
    handle = next(iter(mobi_layers(twin).values())).register_forward_pre_hook(
        lambda layer, args: marked.append(layers_module.current_pass_mask()))
    with torch.no_grad():
        twin(served[1], attention_mask=torch.ones_like(served[1]))
    handle.remove()
    assert marked == [None]
    counted = held.meter.weighted_tokens
    logits(model, served[1])
    assert held.meter.weighted_tokens > counted and held.budget != budget


def as_pickled_by_an_earlier_version(model: torch.nn.Module, hold: BudgetHold) -> None:
    """Lay ``hold`` and its hooks on ``model`` out as mobiquant 1a7d030 did: no release flag, no mask hooks' owner,
    a BitMeter as the pass meter, and mask hooks that are partials of ``_record_mask`` / ``_forget_mask``."""
    hold._pass_hooks.remove()
    del hold._pass_hooks, hold._released
    hold._this_pass = BitMeter()
    hold._weights = float(sum(layer.in_features * layer.out_features for layer in mobi_layers(model).values()))
    meters = [hold._this_pass, hold.meter]
    hold._handles = [
        hold._handles[0],
        model.register_forward_pre_hook(functools.partial(precision._record_mask, meters, None), with_kwargs=True),
        model.register_forward_hook(functools.partial(precision._forget_mask, meters), always_call=True),
    ]


def test_a_model_pickled_holding_a_budget_by_an_earlier_version_still_holds_it() -> None:
    model = quantize_tiny(tiny_model("llama", seed=3), seed=3)
    as_pickled_by_an_earlier_version(model, hold_budget(model, 3.0, horizon_tokens=8))
    twin = pickled(model)
    hold = getattr(twin, precision._HOLD_ATTRIBUTE)
    budget = hold.budget
    logits(twin, torch.randint(0, VOCAB, (1, 6)))
    assert hold.budget != budget
    set_precision(twin, slices=2)
    assert not any(layer.bit_meters for layer in mobi_layers(twin).values())


def test_torch_compile_runs_a_routed_model_as_it_runs_eagerly() -> None:
    model = quantize_tiny(tiny_model("llama", seed=4), seed=4)
    set_uniform(model, None, threshold=1.5)
    ids = torch.randint(0, VOCAB, (2, 8))
    eager = logits(model, ids)
    try:
        compiled = logits(torch.compile(model), ids)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)


def padded_prompts() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three prompts of 3, 11 and 7 tokens, a next token for each, and the prompts left-padded into one batch with
    its attention mask."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (length,), generator=generator) for length in (3, 11, 7)]
    next_tokens = torch.randint(3, VOCAB, (3,), generator=generator)
    width = max(len(prompt) for prompt in prompts)
    batch = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    return prompts, next_tokens, batch, mask


def bits_of_a_padded_batch(model: torch.nn.Module, batch: torch.Tensor, mask: torch.Tensor,
                           next_tokens: torch.Tensor) -> float:
    """Average bits ``track_bits`` measures over the padded batch's prefill and one decode step."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = len(batch)
    with track_bits(model) as meter, torch.no_grad():
        cache = model(batch, attention_mask=mask, position_ids=positions, use_cache=True).cache
        model(next_tokens.unsqueeze(1), attention_mask=torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], 1),
              position_ids=positions[:, -1:] + 1, cache=cache, use_cache=True)
    return meter.avg_bits


def bits_of_each_prompt_alone(model: torch.nn.Module, prompts: list[torch.Tensor], next_tokens: torch.Tensor) -> float:
    """Average bits of each prompt's prefill and one decode step, run alone, from the layers' own routing."""
    spent = [0.0, 0.0]

    def count(layer: MoBiLinear, args: tuple) -> None:
        slices, weights = layer.route(args[0]), layer.in_features * layer.out_features
        spent[0] += 2 * float(slices.sum()) * weights
        spent[1] += slices.numel() * weights

    handles = [layer.register_forward_pre_hook(count) for layer in mobi_layers(model).values()]
    with torch.no_grad():
        for prompt, token in zip(prompts, next_tokens, strict=True):
            cache = model(prompt.unsqueeze(0), use_cache=True).cache
            model(token.view(1, 1), cache=cache, use_cache=True)
    for handle in handles:
        handle.remove()
    return spent[0] / spent[1]


def test_padding_counts_in_neither_the_measured_bits_nor_a_held_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantize_tiny(tiny_model("llama", seed=5), seed=5)
    set_uniform(model, None, threshold=1.5)
    prompts, next_tokens, batch, mask = padded_prompts()
    assert bits_of_a_padded_batch(model, batch, mask, next_tokens) == pytest.approx(
        bits_of_each_prompt_alone(model, prompts, next_tokens), rel=1e-12)
    # A held budget moves as far on a padded prompt as on the prompt alone.
    budgets = []
    for ids, attention_mask in ((prompts[0].unsqueeze(0), None), (batch[:1], mask[:1])):
        with hold_budget(model, 3.0, horizon_tokens=8) as hold, torch.no_grad():
            model(ids, attention_mask=attention_mask)
        budgets.append(hold.budget)
    assert budgets[1] == pytest.approx(budgets[0], rel=1e-12)
    assert budgets[0] != pytest.approx(3.0)
    # A held budget and a tracking block meter the same pass: each layer counts (reads the device) once.
    counted = []
    count_once = layers_module._counted_slices
    monkeypatch.setattr(layers_module, "_counted_slices", lambda *args: counted.append(args) or count_once(*args))
    with hold_budget(model, 3.0), track_bits(model), torch.no_grad():
        model(batch, attention_mask=mask)
    assert len(counted) == len(mobi_layers(model))


def test_passes_run_by_two_threads_each_count_with_their_own_mask() -> None:
    model = quantize_tiny(tiny_model("llama", seed=5), seed=5)
    set_uniform(model, None, threshold=1.5)
    generator = torch.Generator().manual_seed(0)
    padded_ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
    padded_ids[1, :5] = 0
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :5] = 0
    other_ids = torch.randint(3, VOCAB, (1, 4), generator=generator)

    def run(ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            model(ids, attention_mask=attention_mask)

    with track_bits(model) as apart:
        run(padded_ids, mask)
        run(other_ids)
    # The unmasked pass runs whole, in another thread, while the padded one waits inside its second block.
    padded_thread = threading.current_thread()
    other_done = threading.Event()

    def run_the_other_pass(module: torch.nn.Module, args: tuple) -> None:
        if threading.current_thread() is padded_thread and not other_done.is_set():
            other = threading.Thread(target=run, args=(other_ids,))
            other.start()
            other.join(timeout=60)
            other_done.set()

    handle = model.model.layers[1].register_forward_pre_hook(run_the_other_pass)
    with track_bits(model) as interleaved:
        run(padded_ids, mask)
    handle.remove()
    assert other_done.is_set()
    assert interleaved.weighted_tokens == apart.weighted_tokens
    assert interleaved.avg_bits == pytest.approx(apart.avg_bits, rel=1e-12)


def right_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one right-padded batch (padding token 0) and its attention mask."""
    width = max(len(prompt) for prompt in prompts)
    batch = torch.stack([torch.cat([p, torch.zeros(width - len(p), dtype=torch.long)]) for p in prompts])
    return batch, torch.stack([torch.arange(width) < len(p) for p in prompts]).long()


def bits_of_prompts_alone(layers: list[MoBiLinear], runs: list[tuple[torch.nn.Module, list[torch.Tensor]]]
                          ) -> tuple[float, float]:
    """Weighted slices and weighted tokens that ``layers`` spend when each model of ``runs`` runs each of its prompts
    alone, unpadded, from the layers' own routing: what a meter of ``layers`` should count."""
    spent = [0.0, 0.0]

    def count(layer: MoBiLinear, args: tuple) -> None:
        slices, weights = layer.route(args[0]), layer.in_features * layer.out_features
        spent[0] += float(slices.sum()) * weights
        spent[1] += slices.numel() * weights

    handles = [layer.register_forward_pre_hook(count) for layer in layers]
    with torch.no_grad():
        for model, prompts in runs:
            for prompt in prompts:
                model(prompt.unsqueeze(0))
    for handle in handles:
        handle.remove()
    return spent[0], spent[1]


def assert_meter_counts(meter: object, reference: tuple[float, float]) -> None:
    assert meter.weighted_tokens == reference[1]
    assert meter.avg_bits == pytest.approx(2 * reference[0] / reference[1], rel=1e-12)


def test_a_pass_run_inside_another_pass_counts_its_own_tokens_and_leaves_the_outer_ones_as_they_were() -> None:
    model = quantize_tiny(tiny_model("llama", seed=5), seed=5)
    set_uniform(model, None, threshold=1.5)
    generator = torch.Generator().manual_seed(1)
    outer = [torch.randint(3, VOCAB, (length,), generator=generator) for length in (3, 9, 6)]
    inner = [torch.randint(3, VOCAB, (length,), generator=generator) for length in (2, 7)]
    outer_batch, outer_mask = right_padded(outer)
    inner_batch, inner_mask = right_padded(inner)
    # A draft model sharing the model's embeddings, first block, norm and head (self-speculative decoding).
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 1
    draft = AutoModelForCausalLM.from_config(config).eval()
    draft.model.embed_tokens, draft.model.norm = model.model.embed_tokens, model.model.norm
    draft.lm_head = model.lm_head
    draft.model.layers = torch.nn.ModuleList([model.model.layers[0]])
    model_layers, draft_layers = list(mobi_layers(model).values()), list(mobi_layers(draft).values())
    assert set(map(id, draft_layers)) < set(map(id, model_layers))

    for inside in (model, draft):
        ran_inside = []

        def run_inside(module: torch.nn.Module, args: tuple, inside: torch.nn.Module = inside,
                       ran_inside: list = ran_inside) -> None:
            # Once, in the outer pass: between its first and second block.
            if not ran_inside:
                ran_inside.append(True)
                inside(inner_batch, attention_mask=inner_mask)

        handle = model.model.layers[1].register_forward_pre_hook(run_inside)
        try:
            with track_bits(model) as outer_meter, track_bits(draft) as draft_meter, torch.no_grad():
                model(outer_batch, attention_mask=outer_mask)
        finally:
            handle.remove()
        assert ran_inside
        # Each meter counts both passes through its model's layers (the draft's are the model's first block), each
        # pass without its own padding.
        runs = [(model, outer), (inside, inner)]
        assert_meter_counts(outer_meter, bits_of_prompts_alone(model_layers, runs))
        assert_meter_counts(draft_meter, bits_of_prompts_alone(draft_layers, runs))


def test_declared_padding_is_not_counted_and_leaves_the_model_run_unmasked() -> None:
    model = quantize_tiny(tiny_model("llama", seed=9), seed=9)
    set_uniform(model, None, threshold=1.5)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (length,), generator=generator) for length in (4, 10, 7)]
    batch, mask = right_padded(prompts)
    with track_bits(model) as meter:
        with declare_padding(model, mask):
            declared = logits(model, batch)
        # Outside the block, a pass without a mask counts every token again.
        logits(model, batch[:1, :4])
    assert torch.equal(declared, logits(model, batch))
    assert_meter_counts(meter, bits_of_prompts_alone(list(mobi_layers(model).values()),
                                                     [(model, prompts), (model, [batch[0, :4]])]))


def test_a_layer_counts_on_its_own_device_with_a_mask_made_once_per_pass() -> None:
    # A layer on another device than the pass's mask (device_map across devices), simulated with the meta device.
    pass_mask = PassMask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    slice_sum, tokens = layers_module._counted_slices(torch.ones(2, 3, dtype=torch.long, device="meta"), pass_mask)
    assert (slice_sum.device.type, slice_sum.shape, tokens) == ("meta", torch.Size([]), 5)
    slice_sum, tokens = layers_module._counted_slices(torch.tensor([[4, 3, 2], [1, 2, 3]]), pass_mask)
    assert (int(slice_sum), tokens) == (3 + 2 + 1 + 2 + 3, 5)
    # The mask each layer multiplies by is built once per pass, number of new tokens and device.
    assert pass_mask.real_tokens(6, torch.device("cpu"))[0] is pass_mask.real_tokens(6, torch.device("cpu"))[0]
    assert pass_mask.real_tokens(7, torch.device("cpu")) is None


def test_dense_weights_cached_in_inference_mode_allow_a_later_backward() -> None:
    ids = torch.randint(0, VOCAB, (2, 8))
    model, reference = (quantize_tiny(tiny_model("llama", seed=6), seed=6) for _ in range(2))
    for layer in mobi_layers(model).values():
        layer.cache_dense = True
    with torch.inference_mode():
        model(ids)
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    gradient, expected = model.get_input_embeddings().weight.grad, reference.get_input_embeddings().weight.grad
    torch.testing.assert_close(gradient, expected)
    assert all(layer.dense_cache_bytes for layer in mobi_layers(model).values())


def test_routers_are_not_offered_to_an_optimizer(tmp_path: Path) -> None:
    folder = saved_checkpoint(tmp_path / "ckpt", seed=7)
    ids = torch.randint(0, VOCAB, (2, 8))
    for model in (AutoModelForCausalLM.from_pretrained(folder), load_checkpoint(folder),
                  attach_quantizer(quantize_tiny(tiny_model("llama", seed=7), seed=7))):
        model.train()
        routers = {id(p) for layer in mobi_layers(model).values() for p in layer.router.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert routers and trainable and not routers & {id(p) for p in trainable}
        set_uniform(model, None, threshold=1.5)
        model(ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in trainable)


def test_a_push_to_an_unreachable_hub_is_one_line_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    folder = saved_checkpoint(tmp_path / "ckpt", seed=8)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = (
        "import sys\n"
        "import mobiquant\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "try:\n"
        "    model.push_to_hub('someone/tiny-mobiquant', token='hf_unused')\n"
        "except ConnectionError as error:\n"
        "    print(error)\n"
    )
    environment = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "TMPDIR": str(scratch)}
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert "\n" not in message and message.startswith(f"cannot reach the Hugging Face Hub at {endpoint} (")
    assert message.endswith("the push did not complete: check the network, or HF_ENDPOINT")
    assert not any(scratch.iterdir())


def test_a_push_that_times_out_connecting_is_the_same_one_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    model = load_checkpoint(saved_checkpoint(tmp_path / "ckpt", seed=8))
    library = sys.modules[next(base for base in HfHubHTTPError.__mro__ if base.__name__ == "HTTPError").__module__]

    def time_out(*_args: object, **_kwargs: object) -> None:
        raise library.ConnectTimeout("timed out")

    monkeypatch.setattr(type(model), "push_to_hub", time_out)
    with pytest.raises(ConnectionError, match=rf"^cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
                                              r"\(timed out\); the push did not complete"):
        model.push_to_hub("someone/tiny-mobiquant", token="hf_unused")
    # A client whose HTTP library cannot be told catches nothing rather than failing to push.
    monkeypatch.setattr("huggingface_hub.errors.HfHubHTTPError", type("HfHubHTTPError", (Exception,), {}))
    with pytest.raises(library.ConnectTimeout):
        model.push_to_hub("someone/tiny-mobiquant", token="hf_unused")


@pytest.mark.parametrize("copy_of", [pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_a_copy_made_while_bits_are_tracked_has_no_meters(copy_of: Callable) -> None:
    model = quantize_tiny(tiny_model("llama", seed=9), seed=9)
    set_uniform(model, 2)
    ids = torch.randint(0, VOCAB, (1, 5))
    with track_bits(model) as meter, torch.no_grad():
        twin = copy_of(model)
        twin(ids)
        assert meter.weighted_tokens == 0
        model(ids)
        counted = meter.weighted_tokens
    assert counted == 5 * sum(layer.in_features * layer.out_features for layer in mobi_layers(model).values())
    assert all(not layer.bit_meters for copied in (model, twin) for layer in mobi_layers(copied).values())
