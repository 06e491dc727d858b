"""End-to-end tuning of the group parameters (mobiquant.calibration.end_to_end), against float64 references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_method import FAST, tiny_llama
from tiny_models import tiny_model

import mobiquant.calibration.end_to_end as end_to_end
from mobiquant.calibration import CalibrationConfig, quantize_model
from mobiquant.calibration.capture import capture_block_inputs
from mobiquant.calibration.end_to_end import TunedLinear, coarse_kl, stage_key, step_objectives, write_teacher
from mobiquant.layers import MoBiLinear
from mobiquant.model_files import InMemoryModel, ModelFiles
from mobiquant.precision import mobi_layers, set_precision
from mobiquant.slicing import full_codes, slice_weight

TUNED = {**FAST, "end_to_end_lr": 1e-2}


def full_kl64(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    p = F.log_softmax(teacher_logits.double(), dim=-1)
    q = F.log_softmax(student_logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).mean()


def reference_kl(student_logits: torch.Tensor, top: torch.return_types.topk) -> torch.Tensor:
    """The KL of the coarsened distributions in float64, from probabilities; the student's rest summed over the
    tokens outside the top ones."""
    q = F.softmax(student_logits.double(), dim=-1)
    outside = torch.ones_like(q).scatter(-1, top.indices, 0.0)
    p_top = top.values.exp()
    # With no token outside, the teacher's rest is rounding: none.
    p_rest = (1 - p_top.sum(-1, keepdim=True)).clamp(min=0) * outside.amax(-1, keepdim=True)
    p_coarse = torch.cat([p_top, p_rest], -1)
    q_coarse = torch.cat([q.gather(-1, top.indices), (q * outside).sum(-1, keepdim=True)], -1)
    kept = p_coarse > 0
    terms = torch.where(kept, p_coarse * (p_coarse.clamp(min=1e-300).log() - q_coarse.where(kept, 1.0).log()), 0.0)
    return terms.sum(-1).mean()


def test_coarse_kl_and_its_gradient_are_those_of_the_coarsened_distributions_float64() -> None:
    torch.manual_seed(11)
    vocab = 50
    teacher_logits = 3 * torch.randn(2, 5, vocab)
    # The last position's student is sure of the teacher's top token: its rest holds almost no mass.
    student_logits = 3 * torch.randn(2, 5, vocab)
    student_logits[1, 4, teacher_logits[1, 4].argmax()] = 40.0
    p = F.log_softmax(teacher_logits.double(), dim=-1)
    for top_k in (1, 7, vocab):
        top = torch.topk(p, top_k, dim=-1)
        student = student_logits.double().requires_grad_(True)
        reference = reference_kl(student, top)
        (reference_grad,) = torch.autograd.grad(reference, student)
        got_student = student_logits.clone().requires_grad_(True)
        got = coarse_kl(got_student, top.values.float(), top.indices)
        got.backward()
        assert got.item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-6)
        # The gradient the stage trains on.
        torch.testing.assert_close(got_student.grad.double(), reference_grad, rtol=1e-4, atol=1e-7)
        assert got.item() <= full_kl64(teacher_logits, student_logits).item() + 1e-6
    assert got.item() == pytest.approx(full_kl64(teacher_logits, student_logits).item(), rel=1e-4)


# The fused head and loss against float64: elementwise in float32; under bf16 autocast the head's product rounds
# its inputs to 8 bits of mantissa, so the value is looser and the gradient is held to its whole tensor's size.
HEAD_KL_TOLERANCES = {False: {"value": 1e-5, "grad": (1e-4, 1e-6)}, True: {"value": 2e-2, "grad": 3e-2}}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
def test_the_fused_head_and_loss_give_the_coarse_kl_and_its_gradient_in_the_hidden_states_float64(
        autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(17)
    vocab, features = 40, 24
    # Three positions per chunk: ten positions end on a shorter chunk.
    monkeypatch.setitem(end_to_end.LOGIT_CHUNK_ELEMENTS, "cpu", 3 * vocab + 5)
    weight, bias = torch.randn(vocab, features), torch.randn(vocab)
    hidden = torch.randn(2, 5, features)
    teacher = F.log_softmax(3 * torch.randn(2, 5, vocab).double(), dim=-1)
    # The last position's student is sure of the teacher's top token: its rest holds almost no mass.
    hidden[1, 4] = 6 * weight[teacher[1, 4].argmax()] / weight[teacher[1, 4].argmax()].norm()
    tolerance = HEAD_KL_TOLERANCES[autocast]
    for top_k in (1, 7, vocab):
        top = torch.topk(teacher, top_k, dim=-1)
        hidden64 = hidden.double().requires_grad_(True)
        reference = reference_kl(hidden64 @ weight.double().T + bias.double(), top)
        (reference_grad,) = torch.autograd.grad(reference, hidden64)
        got_hidden = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            dtype = torch.bfloat16 if autocast else torch.float32
            got = end_to_end._HeadKL.apply(got_hidden, weight.to(dtype), bias, top.values.float(), top.indices)
        (3.0 * got).backward()
        assert got.dtype == torch.float32 and got_hidden.grad.dtype == torch.float32
        assert got.item() == pytest.approx(reference.item(), rel=tolerance["value"], abs=1e-6)
        if autocast:
            error = (got_hidden.grad.double() - 3.0 * reference_grad).norm() / reference_grad.norm()
            assert error < tolerance["grad"] * 3.0
        else:
            rtol, atol = tolerance["grad"]
            torch.testing.assert_close(got_hidden.grad.double(), 3.0 * reference_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_students_loss_through_the_head_slot_is_the_coarse_kl_of_the_models_logits(family: str) -> None:
    torch.manual_seed(19)
    model = tiny_model(family, seed=6)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    top = torch.topk(F.log_softmax(3 * torch.randn(2, 12, model.config.vocab_size), dim=-1), 9, dim=-1)
    norm = model.model.norm.weight

    def loss_and_grad(slot: bool) -> tuple[float, torch.Tensor]:
        norm.grad = None
        if slot:
            with end_to_end.head_slot(model) as head:
                loss = end_to_end.student_kl(model, head, tokens, top.values, top.indices)
                loss.backward()
            # Gemma 2 caps its logits: the slot has handed them over whole.
            assert head.fused == (family == "llama")
        else:
            loss = coarse_kl(model(tokens, use_cache=False).logits, top.values, top.indices)
            loss.backward()
        return loss.item(), norm.grad.clone()

    (expected, expected_grad), (got, got_grad) = loss_and_grad(False), loss_and_grad(True)
    assert got == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-7)
    # The slot is gone: the model computes its logits again.
    assert model.get_output_embeddings().weight.shape[0] == model.config.vocab_size
    assert model(tokens).logits.shape[-1] == model.config.vocab_size


# Under bf16 autocast the products round their inputs to 8 bits of mantissa: the same values, looser; a group's
# gradient sums terms of both signs, so it is held to the whole tensor's size there, not to its own.
PRODUCT_TOLERANCES = {False: {"value": (1e-5, 1e-4), "grad": 1e-4}, True: {"value": (2e-2, 5e-2), "grad": 1e-2}}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
def test_tuned_linear_rebuilds_its_weight_and_gradients_from_the_tuned_parameters_float64(autocast: bool) -> None:
    torch.manual_seed(12)
    (value_rtol, value_atol), grad_tolerance = PRODUCT_TOLERANCES[autocast].values()
    out_features, in_features, group, slices = 24, 64, 32, 4
    weight = torch.randn(out_features, in_features)
    sliced = slice_weight(weight, group_size=group, num_slices=slices)
    layer = MoBiLinear(in_features, out_features, slices, group, bias=True, router_hidden=None)
    layer.load_sliced(sliced, torch.randn(out_features))
    layer.gains = (1 + 0.1 * torch.randn(slices, out_features)).half()
    tuned = TunedLinear(layer)
    with torch.no_grad():
        for tensor in (tuned.log_scale, tuned.zero_shift, tuned.log_gain):
            tensor.copy_(0.05 * torch.randn(tensor.shape))
    x = torch.randn(5, in_features)

    def reference(scale: torch.Tensor, zero: torch.Tensor, gains: torch.Tensor, k: int,
                  inputs: torch.Tensor | None = None) -> torch.Tensor:
        # W_k = C + g_k (s ((c_k + 0.5) / 4^(k-1) - z) - C), C = s (2 - z), per group; the codes are the stored ones.
        codes = stored_codes >> (2 * (slices - k))
        s, z = scale.repeat_interleave(group, -1), zero.repeat_interleave(group, -1)
        centre = s * (2 - z)
        weight = centre + gains[k - 1, :, None] * (s * ((codes.double() + 0.5) / 4 ** (k - 1) - z) - centre)
        return (x.double() if inputs is None else inputs) @ weight.T + layer.bias.double()

    # slice_weight stores the floor codes of the weight on its grid.
    stored_codes = full_codes(weight, sliced.scale, sliced.zero, slices)
    scale = layer.scale.double() * tuned.log_scale.double().exp()
    zero = layer.zero.double() + tuned.zero_shift.double()
    gains = layer.gains.double() * tuned.log_gain.double().exp()
    trained = (tuned.log_scale, tuned.zero_shift, tuned.log_gain)
    for k in range(1, slices + 1):
        tuned.slices = k
        x_grad = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = tuned(x_grad)
        assert got.dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.testing.assert_close(got.double(), reference(scale, zero, gains, k), rtol=value_rtol, atol=value_atol)
        # The gradients the stage trains on, against float64 autograd through the reference.
        upstream = torch.randn(got.shape, dtype=torch.float64)
        got.backward(upstream.float())
        got_grads = [x_grad.grad] + [t.grad.clone() for t in trained]
        # The trained tensors and the input keep their own precision whatever the products ran in.
        assert all(grad.dtype == torch.float32 for grad in got_grads)
        x64 = x.double().requires_grad_(True)
        trained64 = [t.detach().double().requires_grad_(True) for t in trained]
        out64 = reference(layer.scale.double() * trained64[0].exp(), layer.zero.double() + trained64[1],
                          layer.gains.double() * trained64[2].exp(), k, x64)
        expected_grads = torch.autograd.grad(out64, [x64, *trained64], upstream)
        for name, got_grad, expected in zip(("x", "log_scale", "zero_shift", "log_gain"), got_grads, expected_grads,
                                            strict=True):
            if autocast:
                relative = (got_grad.double() - expected).norm() / expected.norm()
                assert relative < grad_tolerance, (name, k, relative.item())
            else:
                torch.testing.assert_close(got_grad.double(), expected, rtol=grad_tolerance, atol=grad_tolerance,
                                           msg=lambda m, name=name, k=k: f"{name} at {k}: {m}")
        for t in trained:
            t.grad = None
    tuned.write_back()
    # Stored as the format's float16, and run by the layer itself.
    for k in range(1, slices + 1):
        expected = reference(scale.half().double(), zero.half().double(), gains.half().double(), k)
        torch.testing.assert_close(layer(x, slices=k).double(), expected, rtol=1e-5, atol=1e-4)


def named_layers(model: torch.nn.Module) -> list[tuple[str, MoBiLinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoBiLinear)]


def weighted_kl(model: torch.nn.Module, fp_logits: torch.Tensor, samples: torch.Tensor,
                objective: dict[int, float]) -> float:
    total = 0.0
    for k, weight in objective.items():
        set_precision(model, slices=k)
        with torch.no_grad():
            total += weight * full_kl64(fp_logits, model(samples).logits).item()
    return total


@pytest.mark.parametrize(("dtype", "schedule"), [("float32", "all"), ("bfloat16", "all"), ("float32", "rotate")])
def test_tuning_lowers_the_weighted_kl_keeps_the_codes_and_refits_the_routers(
        tmp_path: Path, dtype: str, schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(13)
    samples = torch.randint(0, 96, (8, 32))
    with torch.no_grad():
        fp_logits = tiny_llama(3)(samples).logits
    steps = 24 if schedule == "all" else 48
    # The arithmetic under test: a CPU without bf16 instructions runs it too (slowly; calibrations refuse it there).
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    config = CalibrationConfig(**TUNED, end_to_end_steps=steps, end_to_end_dtype=dtype, end_to_end_schedule=schedule)
    untuned = quantize_model(tiny_llama(3), samples, CalibrationConfig(**TUNED), tmp_path / "w", progress=False)
    passes = {"n": 0}
    real_kl = end_to_end.student_kl

    def counted_kl(*args: object) -> torch.Tensor:
        passes["n"] += 1
        return real_kl(*args)

    monkeypatch.setattr(end_to_end, "student_kl", counted_kl)
    tuned = quantize_model(tiny_llama(3), samples, config, tmp_path / "w", progress=False)
    assert passes["n"] == steps * (3 if schedule == "all" else 1)
    objective = config.end_to_end_objective()
    assert objective == {2: 1.0, 3: 1.0, 4: 0.5}
    before, after = (weighted_kl(m, fp_logits, samples, objective) for m in (untuned, tuned))
    assert after < 0.9 * before
    changed, refit = 0, 0
    for (name, a), (_, b) in zip(named_layers(untuned), named_layers(tuned), strict=True):
        assert torch.equal(a.planes, b.planes), name
        changed += not torch.equal(a.scale, b.scale)
        # Fitted again to the tuned weights' errors (tests/test_router_refit.py), from the blocks' routers.
        refit += not torch.equal(a.router.fc1.weight, b.router.fc1.weight)
    assert changed == refit == len(mobi_layers(tuned))
    # Only the tuned tensors trained: the model's own parameters keep their flags.
    assert [p.requires_grad for p in tuned.parameters()] == [p.requires_grad for p in untuned.parameters()]


class Interrupted(Exception):
    pass


def test_an_interrupted_stage_resumes_to_the_same_result_and_a_finished_one_is_read_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(14)
    samples = torch.randint(0, 96, (6, 32))
    config = CalibrationConfig(**TUNED, end_to_end_steps=5)
    whole = quantize_model(tiny_llama(3), samples, config, tmp_path / "whole", progress=False)

    monkeypatch.setattr(end_to_end, "SAVE_EVERY_SECONDS", 0.0)
    calls = {"n": 0}
    real_kl = end_to_end.student_kl

    def failing_kl(*args: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 3 * len(config.end_to_end_objective()):  # during the fourth step
            raise Interrupted
        return real_kl(*args)

    monkeypatch.setattr(end_to_end, "student_kl", failing_kl)
    with pytest.raises(Interrupted):
        quantize_model(tiny_llama(3), samples, config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(end_to_end, "student_kl", real_kl)
    resumed = quantize_model(tiny_llama(3), samples, config, tmp_path / "cut", progress=False)

    def never(*_args: object) -> torch.Tensor:
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(end_to_end, "student_kl", never)
    reread = quantize_model(tiny_llama(3), samples, config, tmp_path / "cut", progress=False)
    for model in (resumed, reread):
        for (name, a), (_, b) in zip(named_layers(whole), named_layers(model), strict=True):
            for tensor in ("scale", "zero", "gains"):
                assert torch.equal(getattr(a, tensor), getattr(b, tensor)), (name, tensor)


def test_the_blocks_are_keyed_without_the_stage_and_the_stage_by_its_settings() -> None:
    base = CalibrationConfig(**FAST)
    tuned = CalibrationConfig(**FAST, end_to_end_steps=8)
    assert tuned.digest() == base.digest() == CalibrationConfig(**FAST, end_to_end_lr=1e-3).digest()
    assert base.model_digest() == base.digest() != tuned.model_digest()
    assert tuned.model_digest() != CalibrationConfig(**FAST, end_to_end_steps=8, end_to_end_lr=1e-3).model_digest()
    in_bf16 = CalibrationConfig(**FAST, end_to_end_steps=8, end_to_end_dtype="bfloat16")
    assert in_bf16.digest() == base.digest() and in_bf16.model_digest() != tuned.model_digest()
    rotated = CalibrationConfig(**FAST, end_to_end_steps=8, end_to_end_schedule="rotate")
    assert rotated.digest() == base.digest() and rotated.model_digest() not in (tuned.model_digest(),
                                                                                 in_bf16.model_digest())
    samples = torch.zeros(2, 8, dtype=torch.long)
    reweighted = CalibrationConfig(**FAST, end_to_end_steps=8, end_to_end_weights=(0, 1, 0, 0))
    keys = {stage_key(config, blocks, samples, 64) for config in (tuned, reweighted, in_bf16, rotated)
            for blocks in ({0: "a", 1: "b"}, {0: "a", 1: "c"})}
    assert len(keys) == 8
    assert stage_key(tuned, {0: "a"}, samples, 64) != stage_key(tuned, {0: "a"}, samples + 1, 64)


@pytest.mark.parametrize(("options", "message"), [
    ({"end_to_end_steps": -1}, "end_to_end_steps must be a whole number >= 0"),
    ({"end_to_end_lr": 0.0}, "end_to_end_lr must be a positive number"),
    ({"end_to_end_lr": float("inf")}, "end_to_end_lr must be a positive number"),
    ({"end_to_end_weights": (1.0, 2.0)}, "end_to_end_weights needs 4 finite non-negative weights"),
    ({"end_to_end_weights": (0.0, 0.0, 0.0, 0.0)}, "end_to_end_weights needs 4 finite non-negative weights"),
    ({"end_to_end_dtype": "float16"}, r"end_to_end_dtype must be one of \('float32', 'bfloat16'\)"),
    ({"end_to_end_schedule": "random"}, r"end_to_end_schedule must be one of \('all', 'rotate'\)"),
])
def test_bad_stage_settings_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**options)



def test_a_bf16_stage_on_a_cpu_without_bf16_instructions_is_refused_before_the_work_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Such a CPU runs bf16 products in a reference kernel, many times slower than float32.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    config = CalibrationConfig(**TUNED, end_to_end_steps=2, end_to_end_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"^end_to_end_dtype bfloat16 needs a GPU or a CPU with bf16 instructions"):
        quantize_model(tiny_llama(3), torch.randint(0, 96, (4, 32)), config, tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()

def test_rotating_steps_run_one_slice_count_each_in_the_weights_proportions_spread_out() -> None:
    objective = {2: 1.0, 3: 1.0, 4: 0.5}
    assert step_objectives(objective, "all", 3) == [objective] * 3
    assert step_objectives(objective, "rotate", 10) == [{k: 2.5} for k in (2, 3, 4, 2, 3) * 2]
    assert step_objectives({3: 2.0}, "rotate", 2) == [{3: 2.0}] * 2
    generator = torch.Generator().manual_seed(21)
    for _ in range(5):
        weights = (torch.rand(4, generator=generator) + 0.05).tolist()
        objective = dict(zip((1, 2, 3, 4), weights, strict=True))
        steps = 97
        chosen = [next(iter(step)) for step in step_objectives(objective, "rotate", steps)]
        assert all(next(iter(step.values())) == pytest.approx(sum(weights))
                   for step in step_objectives(objective, "rotate", steps))
        for k, weight in objective.items():
            # Every prefix of the steps holds each count in its share, to within one step.
            for prefix in range(1, steps + 1):
                assert abs(chosen[:prefix].count(k) - prefix * weight / sum(weights)) < 1.0 + 1e-9, (k, prefix)


def test_the_objective_follows_the_slices_held() -> None:
    assert CalibrationConfig(num_slices=2).end_to_end_objective() == {2: 1.0}
    assert CalibrationConfig(num_slices=1).end_to_end_objective() == {1: 1.0}
    assert CalibrationConfig(target_bits=4.0).end_to_end_objective() == {2: 1.0}
    assert CalibrationConfig(end_to_end_weights=(1, 0, 0, 2)).end_to_end_objective() == {1: 1.0, 4: 2.0}


@pytest.mark.parametrize("source_kind", ["files", "in memory"])
def test_the_teacher_is_the_full_precision_models_top_log_probabilities(tmp_path: Path, source_kind: str) -> None:
    torch.manual_seed(15)
    model = tiny_model("llama", seed=5)
    samples = torch.randint(3, 128, (3, 16))
    with torch.no_grad():
        reference = torch.topk(F.log_softmax(model(samples).logits.double(), -1), 10, dim=-1)
    if source_kind == "files":
        model.save_pretrained(tmp_path / "src")
        source = ModelFiles(tmp_path / "src")
    else:
        source = InMemoryModel(model)
    capture_block_inputs(source, samples, tmp_path / "capture", device=torch.device("cpu"), model_key="tiny",
                         store_dtype=torch.float32)
    path = write_teacher(source, tmp_path / "capture", samples, tmp_path / "teacher.safetensors", 10,
                         torch.device("cpu"), batch_size=2)
    teacher = end_to_end.load_file(str(path))
    torch.testing.assert_close(teacher["log_probs"].double(), reference.values, rtol=0, atol=1e-4)
    assert torch.equal(teacher["indices"], reference.indices)
