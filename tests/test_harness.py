"""``mobiquant eval --tasks``: lm-eval-harness tasks at each precision, on a local JSON task (no network)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from mobiquant.checkpoint import load_checkpoint
from mobiquant.precision import set_precision
from tests.test_cli import byte_tokenizer, checkpoint, one_line, run, text_file

__all__ = ["checkpoint", "text_file"]  # module fixtures of test_cli, used here

TASK, LL_TASK = "tiny_arith", "tiny_arith_ll"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tasks on one local JSON file: multiple choice (accuracy) and the right answer's perplexity."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    with (folder / "arith.jsonl").open("w") as handle:
        for _ in range(16):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            choices = [str(a + b), str(a * b + 10), str(a + b + 1)]
            handle.write(json.dumps({"question": f"{a} plus {b} is", "choices": choices, "answer": rng.randrange(3)}))
            handle.write("\n")
    (folder / "arith.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'arith.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "arith_ll.yaml").write_text(
        f"task: {LL_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'arith.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{question}}"\n'
        # A loglikelihood task's continuation is its target verbatim (no target_delimiter): the space is written here.
        "doc_to_target: \"{{' ' + choices[answer]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The task's JSON is read into a cache of this test's own, never one shared with other runs.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def reference_scores(
    model: torch.nn.Module, tokenizer: Any, task_dir: Path, documents: list[dict[str, Any]] | None = None
) -> dict[str, float]:
    """Both tasks' metrics from first principles: a choice's score is the log-likelihood of its tokens (after a
    space) following the question, the continuation being what the whole text's tokens add to the question's
    (the harness's split); accuracy picks the best-scored choice, perplexity is exp of minus the right answers'
    mean log-likelihood."""

    def log_likelihood(question: str, answer: str) -> float:
        ids = tokenizer.encode(question + " " + answer)
        continuation = len(ids) - len(tokenizer.encode(question))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        return float(log_probs.gather(-1, torch.tensor(ids[1:])[:, None])[-continuation:].sum())

    correct, right_answers = [], []
    if documents is None:
        documents = [json.loads(line) for line in (task_dir / "arith.jsonl").read_text().splitlines()]
    for doc in documents:
        scores = [log_likelihood(doc["question"], choice) for choice in doc["choices"]]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
        right_answers.append(scores[doc["answer"]])
    return {
        f"{TASK} acc": sum(correct) / len(correct),
        f"{LL_TASK} perplexity": math.exp(-sum(right_answers) / len(right_answers)),
    }


def harness_diagnosis(model: torch.nn.Module, tokenizer: Any, task_dir: Path) -> str:
    """Each right answer's log-likelihood as lm-eval scores it in this process next to the first-principles one,
    for a failure message: it tells a wrong request (text, split) from a wrong score of the right request."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from mobiquant.harness import task_manager

    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=[LL_TASK],
        task_manager=task_manager(task_dir), log_samples=True, bootstrap_iters=0,
    )  # fmt: skip
    lines = []
    for sample in results["samples"][LL_TASK]:
        context, continuation = sample["arguments"][0][:2]
        reference = reference_scores(model, tokenizer, task_dir, documents=[sample["doc"]])
        lines.append(
            f"{context!r}+{continuation!r}: lm-eval {sample['resps'][0][0][0]:.6f}, "
            f"first principles {-math.log(reference[f'{LL_TASK} perplexity']):.6f}"
        )
    return "\n".join(lines)


def test_tasks_at_each_precision_match_first_principles(
    capsys: pytest.CaptureFixture, checkpoint: Path, task_dir: Path, tmp_path: Path
) -> None:
    # The command runs as users run it, in a process of its own whose caches (home, Hugging Face, mobiquant) are
    # empty folders of this test: no state of earlier tests or earlier runs on this machine can reach it.
    home = tmp_path / "home"
    # Nothing of the caller's environment but PATH: no variable set on this machine can steer the command.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONUTF8": "1", "HOME": str(home),
           "XDG_CACHE_HOME": str(home / ".cache"), "HF_HOME": str(home / "hf"),
           "HF_DATASETS_CACHE": str(home / "datasets"), "MOBIQUANT_CACHE": str(home / "mobiquant"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = [
        sys.executable, "-c", "import sys; from mobiquant.cli import main; sys.exit(main(sys.argv[1:]))",
        "eval", str(checkpoint), "--tasks", f"{TASK},{LL_TASK}", "--include-path", str(task_dir),
        "--uniform", "1,4", "--avg-bits", "5", "--device", "cpu", "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert [(r["mode"], r["target"]) for r in rows] == [("uniform", 1), ("uniform", 4), ("routed", 5.0)]
    assert rows[0]["avg_bits"] == 2.0 and rows[1]["avg_bits"] == 8.0 and 2.0 < rows[2]["avg_bits"] < 8.0
    model = load_checkpoint(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # the one the command loads with the checkpoint
    expected = []
    for setting in [{"slices": 1}, {"slices": 4}, {"avg_bits": 5.0}]:
        set_precision(model, **setting)
        expected.append(reference_scores(model, tokenizer, task_dir))
    measured = [row["tasks"] for row in rows]
    if measured != [{key: pytest.approx(value, rel=1e-6) for key, value in e.items()} for e in expected]:
        set_precision(model, slices=1)
        pytest.fail(
            f"lm-eval scores {measured}, first principles {expected}; one slice, per right answer:\n"
            f"{harness_diagnosis(model, tokenizer, task_dir)}"
        )
    # Each setting ran at its own precision: the right answers' perplexity moves with it.
    assert len({row["tasks"][f"{LL_TASK} perplexity"] for row in rows}) == 3

    code, out, err = run(
        capsys, "eval", str(checkpoint), "--tasks", TASK, "--include-path", str(task_dir), "--uniform", "2",
        "--limit", "4",
    )  # fmt: skip
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].endswith(f"lm-eval {TASK}, first 4 documents of each task")
    assert lines[1].split() == ["setting", "avg", "bits", TASK, "acc"]  # only what the harness measured
    assert lines[2].split()[:4] == ["uniform", "2", "slices", "4.000"] and len(lines) == 3


def test_task_errors_are_one_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, checkpoint: Path, task_dir: Path
) -> None:
    code, _, err = run(capsys, "eval", str(checkpoint), "--tasks", "tiny_arth", "--include-path", str(task_dir))
    assert code == 1 and "unknown lm-eval task 'tiny_arth' (did you mean tiny_arith" in one_line(err)
    # Without the harness installed.
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    code, _, err = run(capsys, "eval", str(checkpoint), "--tasks", TASK)
    assert code == 1 and "need lm-eval-harness, which is not installed" in one_line(err)
    assert "`pip install '.[eval]'`" in err


def test_pipeline_validation_gates_on_task_scores(
    checkpoint: Path, text_file: Path, task_dir: Path, tmp_path: Path
) -> None:
    from flows.params import GateThresholds
    from registry.hashing import tree_manifest
    from tasks.gate import evaluate_gate
    from tasks.stages import validate
    from tests.test_cli import tiny_llama

    source = tmp_path / "source"
    tiny_llama().save_pretrained(source)  # the weights the checkpoint was sliced from (same seed)
    byte_tokenizer().save_pretrained(source)
    validation = validate(
        source,
        checkpoint,
        evaluation_data=str(text_file),
        eval_seqlen=64,
        eval_max_windows=2,
        budgets=[3.0],
        num_slices=4,
        group_size=32,
        device="cpu",
        out_path=tmp_path / "validation.json",
        model_key="tiny-llama",
        checkpoint_files=tree_manifest(checkpoint),
        tasks=[TASK],
        task_bits=[3.0],
        task_include_path=str(task_dir),
        task_limit=8,
    )
    (row,) = validation["tasks"]
    score = row["tasks"][f"{TASK} acc"]
    assert row["target"] == 3.0 and 2.0 < row["avg_bits"] < 4.0 and 0.0 <= score <= 1.0
    met = evaluate_gate(validation, GateThresholds(min_task_score={3.0: {f"{TASK} acc": score}}))
    assert [c.passed for c in met if c.name == f"{TASK} acc@3"] == [True]
    missed = evaluate_gate(
        validation, GateThresholds(min_task_score={3.0: {f"{TASK} acc": score + 0.01, f"{TASK} f1": 0.0}})
    )
    assert {c.name: c.passed for c in missed if "@3" in c.name and TASK in c.name} == {
        f"{TASK} acc@3": False,
        f"{TASK} f1@3": False,
    }


def test_avg_bits_count_no_padding_at_any_batch_size(checkpoint: Path, task_dir: Path) -> None:
    """lm-eval right-pads the likelihood requests of a batch and calls the model with no mask: above batch size 1
    the bits measured count only the requests' own tokens, as at batch size 1 (where no request is padded)."""
    from mobiquant.harness import evaluate_tasks, task_manager

    model = load_checkpoint(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    manager = task_manager(task_dir)
    batches = []
    handle = model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape))

    def measured(batch_size: int) -> list[dict[str, Any]]:
        batches.clear()
        return evaluate_tasks(model, tokenizer, manager, [TASK, LL_TASK],
                              [("routed", 5.0, {"avg_bits": 5.0}), ("uniform", 2, {"slices": 2})], limit=6,
                              batch_size=batch_size)  # fmt: skip

    try:
        alone = measured(1)
        assert batches and all(shape[0] == 1 for shape in batches)
        batched = measured(4)
        # The batches held requests of several lengths, so lm-eval padded them.
        assert any(shape[0] > 1 for shape in batches)
    finally:
        handle.remove()
    assert [row["tasks"] for row in batched] == [
        {key: pytest.approx(value, rel=1e-6) for key, value in row["tasks"].items()} for row in alone
    ]
    assert batched[1]["avg_bits"] == alone[1]["avg_bits"] == 4.0
    assert batched[0]["avg_bits"] == pytest.approx(alone[0]["avg_bits"], rel=1e-9)


def test_padding_is_recorded_per_thread_by_evaluations_running_at_once() -> None:
    """Two evaluations in two threads (two models on two devices) each record their own batches' padding, whichever
    ends first, and lm-eval's pad_and_concat is its own again once both have ended."""
    import threading

    from lm_eval.models.huggingface import HFLM

    from mobiquant.harness import padding_metered, recording_right_padding

    wrapped_class = padding_metered(HFLM)
    module = sys.modules[wrapped_class.padding_module]
    original = module.pad_and_concat
    first, second = object.__new__(wrapped_class), object.__new__(wrapped_class)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def pad(lengths: list[int]) -> Any:
        return module.pad_and_concat(max(lengths), [torch.arange(1, n + 1) for n in lengths], padding_side="right")

    def run_first() -> None:
        with recording_right_padding(first):
            first_in.set()
            second_in.wait(10)
            padded = pad([2, 3])
            seen["first"] = first._right_padded
            seen["first_batch"] = padded
        first_out.set()

    def run_second() -> None:
        first_in.wait(10)
        with recording_right_padding(second):
            second_in.set()
            first_out.wait(10)
            padded = pad([4, 1, 2])
            seen["second"] = second._right_padded
            seen["second_batch"] = padded

    threads = [threading.Thread(target=run_first), threading.Thread(target=run_second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen["first"][0] is seen["first_batch"]
    assert seen["first"][1].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert seen["second"] is not None and seen["second"][0] is seen["second_batch"]
    assert seen["second"][1].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert module.pad_and_concat is original
