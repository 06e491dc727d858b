"""Content hashes: the identity of every file the pipeline writes, records or publishes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mobiquant.sources import file_sha256 as sha256_file


def tree_manifest(root: str | Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every regular file under ``root``, sorted by path."""
    base = Path(root)
    files = sorted(p for p in base.rglob("*") if p.is_file())
    return {p.relative_to(base).as_posix(): sha256_file(p) for p in files}


def manifest_digest(manifest: dict[str, str]) -> str:
    """One hash naming a whole set of files (used as the commit id of the local publish target)."""
    digest = hashlib.sha256()
    for path in sorted(manifest):
        digest.update(f"{path}\0{manifest[path]}\n".encode())
    return digest.hexdigest()
