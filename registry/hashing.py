"""Content hashes: the identity of every file the pipeline writes, records or publishes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mobiquant.sources import file_sha256 as sha256_file

_CHUNK = 1 << 22


def tree_manifest(root: str | Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every regular file under ``root``, sorted by path."""
    base = Path(root)
    files = sorted(p for p in base.rglob("*") if p.is_file())
    return {p.relative_to(base).as_posix(): sha256_file(p) for p in files}


def git_blob_id(path: str | Path) -> str:
    """The id git (and the Hub's tree listing, for a file not stored in LFS) gives ``path``'s content."""
    file = Path(path)
    digest = hashlib.sha1(b"blob %d\0" % file.stat().st_size)
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, str]) -> str:
    """One hash naming a whole set of files (used as the commit id of the local publish target)."""
    digest = hashlib.sha256()
    for path in sorted(manifest):
        digest.update(f"{path}\0{manifest[path]}\n".encode())
    return digest.hexdigest()


def copy_tree_hashed(source: str | Path, target: str | Path) -> dict[str, str]:
    """Copy every regular file under ``source`` into ``target`` and return their :func:`tree_manifest`, hashed from
    the bytes as they are copied: each file is read once, and the copy is not read back to hash it.

    Regular files only, which is what a release bundle holds: a symlink to a file is copied as the file it points to,
    a symlinked folder is not followed, empty folders are not made, and modes (an executable bit) are not kept.
    """
    base, out = Path(source), Path(target)
    manifest = {}
    for file in sorted(p for p in base.rglob("*") if p.is_file()):
        relative = file.relative_to(base).as_posix()
        copy = out / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(file, "rb") as reader, open(copy, "wb") as writer:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                writer.write(chunk)
        manifest[relative] = digest.hexdigest()
    return manifest
