"""Checks on a folder about to receive a checkpoint, made before any slow work starts.

A checkpoint replaces its output folder only when that folder is empty or already holds a MoBiQuant
checkpoint, and never when the folder is, or contains, something the run reads or keeps (the source
model, the work folder, a cache): a mistyped ``-o`` must not delete a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path


class OutputError(ValueError):
    """An output folder that would be refused or would destroy something: said before any work."""


def holds_mobiquant_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, OSError, AttributeError):
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == "mobiquant"


def is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(output: str | os.PathLike, force: bool, protected: Iterable[tuple[str, str | os.PathLike]] = ()
                     ) -> Path:
    """The absolute output folder, or one clear :class:`OutputError`; nothing is created or deleted.

    ``protected`` names ``(what, path)`` pairs the output may neither be nor contain. An existing non-empty
    output is replaced only with ``force`` and only if it holds a MoBiQuant checkpoint. The parent must
    exist and be writable, and the output may not be a symbolic link: the checkpoint is renamed into place,
    which a link to a folder refuses (after the whole run, were it not checked here).
    """
    out = Path(output).expanduser().absolute()
    if out.is_symlink():
        if not out.exists():
            raise OutputError(f"output {out} is a symbolic link to nothing ({os.readlink(out)})")
        raise OutputError(f"output {out} is a symbolic link to {os.readlink(out)}: name the folder itself")
    resolved = out.resolve()
    for what, path in protected:
        guarded = Path(path).expanduser().resolve()
        if is_within(guarded, resolved):
            relation = "is" if guarded == resolved else "contains"
            raise OutputError(f"output {out} {relation} the {what} ({guarded}): choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputError(f"output folder {out} is not empty (use --force to replace a MoBiQuant checkpoint)")
        if not holds_mobiquant_checkpoint(out):
            raise OutputError(f"output folder {out} is not empty and holds no MoBiQuant checkpoint: --force only "
                              "replaces an empty folder or an earlier checkpoint")
    parent = resolved.parent
    if not parent.is_dir():
        raise OutputError(f"parent folder of the output does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.is_dir() and not os.access(out, os.W_OK | os.X_OK)):
        raise OutputError(f"output {out} is not writable")
    return out


def check_work_dir(work: str | os.PathLike, output: Path, protected: Iterable[tuple[str, str | os.PathLike]] = ()
                   ) -> Path:
    """The resolved work folder, or one clear :class:`OutputError`: it must be a folder if it exists, the output
    may not lie inside it (the run removes its work when done) and it may not lie inside a ``protected`` folder
    (the run writes there)."""
    resolved = Path(work).expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"work folder {resolved} exists and is not a folder")
    if is_within(output.expanduser().resolve(), resolved):
        raise OutputError(f"output {output} is inside the work folder {resolved}: choose an output outside it")
    for what, path in protected:
        guarded = Path(path).expanduser().resolve()
        if is_within(resolved, guarded):
            raise OutputError(f"work folder {resolved} is inside the {what} ({guarded}): choose another folder")
    return resolved


def staging_dir(target: Path) -> Path:
    """A new, empty folder beside ``target`` to write into before renaming it onto ``target``.

    Its name carries the host, the pid namespace and the process (``.NAME.tmp-HOST-pidnsINODE-PID-XXXXXXXX``), so
    the staging folders that killed writes left for ``target`` (as large as what they wrote) are found and removed
    here first: those of this host and pid namespace whose process is gone. All others are left alone, since their
    processes cannot be seen from here: other hosts', other pid namespaces' (containers may share a hostname and
    a folder but not their pids), and those named without a namespace (by earlier versions, ``HOST-PID-*``).
    """
    namespace = _pid_namespace()
    prefix = f".{target.name}.tmp-{socket.gethostname()}-pidns{namespace if namespace is not None else 'unknown'}-"
    if namespace is not None:
        _remove_dead_staging(target.parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))


def _remove_dead_staging(folder: Path, prefix: str) -> None:
    """Remove the staging folders in ``folder`` named ``PREFIX`` + ``PID-XXXXXXXX`` whose process is gone."""
    for entry in folder.iterdir():
        # mkdtemp's suffix holds no "-": a host whose name merely starts with this one's does not match.
        match = re.fullmatch(r"(\d+)-[^-]+", entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if match and not _process_alive(int(match.group(1))):
            # A folder that cannot be removed must not fail this write.
            shutil.rmtree(entry, ignore_errors=True)


def _pid_namespace() -> int | None:
    """The inode of this process's pid namespace (Linux), or None where it cannot be read (nothing is then judged
    stale: a pid alone does not say whose process it is)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # It exists, as another user's process.
        return True
    return True
