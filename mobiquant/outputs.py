"""Checks on a folder about to receive a checkpoint, made before any slow work starts.

A checkpoint replaces its output folder only when that folder is empty or already holds a MoBiQuant
checkpoint, and never when the folder is, or contains, something the run reads or keeps (the source
model, the work folder, a cache): a mistyped ``-o`` must not delete a model.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_ID_BYTES = 6
STAGING_LOCK_SUFFIX = ".lock"
PENDING_GRACE_S = 60.0


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


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new, empty folder beside ``target`` to write into before renaming it onto ``target``; removed on exit if it
    is still there.

    While it is in use, this process holds an exclusive ``flock`` on a lock file beside it (``.NAME.tmp-XXXXXXXXXXXX``
    and ``.NAME.tmp-XXXXXXXXXXXX.lock``), which the kernel (or the NFS lock manager) releases when the process dies,
    however it dies. So the staging folders that killed writes left for ``target`` (as large as what they wrote)
    are found and removed here first, whichever host, container or pid namespace left them: those whose lock is
    free. Where the file system refuses locks the folder gets no lock file, and folders without one are never judged
    dead by their lock. Those that earlier versions named after their writer (``.NAME.tmp-HOST-pidnsINODE-PID-*``
    and, before that, ``.NAME.tmp-HOST-PID-*``) go by the rule those versions used
    (:func:`_remove_dead_earlier_staging`).
    """
    _remove_dead_staging(target)
    while True:
        name = f".{target.name}.tmp-{secrets.token_hex(STAGING_ID_BYTES)}"
        pending = target.parent / f"{name}{STAGING_LOCK_SUFFIX}-pending"
        try:
            handle = open(pending, "x")  # noqa: SIM115 -- held until the staging folder is gone
        except FileExistsError:
            continue
        break
    folder, lock_path = target.parent / name, target.parent / f"{name}{STAGING_LOCK_SUFFIX}"
    with handle:
        try:
            # Created a moment ago by this process: only a file system without locks refuses it.
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pending.unlink()
        else:
            # Renamed once locked, so that no other process ever sees the lock file free while this one lives.
            os.replace(pending, lock_path)
        try:
            folder.mkdir()
            yield folder
        finally:
            if folder.exists():
                shutil.rmtree(folder)
            # The folder goes before its lock file: a process killed in between leaves only a free lock file.
            lock_path.unlink(missing_ok=True)


def _remove_dead_staging(target: Path) -> None:
    """Remove the staging folders for ``target`` whose lock file is not locked, with their lock files, and lock
    files a writer killed before renaming them left (``.lock-pending``, free and older than a minute: a live
    writer locks its own within microseconds of creating it, and renames it at once)."""
    _remove_dead_earlier_staging(target)
    prefix = f".{target.name}.tmp-"
    pattern = re.compile(rf"({re.escape(prefix)}[0-9a-f]{{{2 * STAGING_ID_BYTES}}})"
                         rf"{re.escape(STAGING_LOCK_SUFFIX)}(-pending)?")
    for lock_path in target.parent.glob(f"{glob.escape(prefix)}*{STAGING_LOCK_SUFFIX}*"):
        match = pattern.fullmatch(lock_path.name)
        if match is None:
            continue
        try:
            if match.group(2) and time.time() - lock_path.stat().st_mtime < PENDING_GRACE_S:
                continue
            descriptor = os.open(lock_path, os.O_RDWR)
        except OSError:
            # Removed by its writer meanwhile, or not ours to open.
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A folder or lock file that cannot be removed (another user's, in a sticky folder) must not fail
            # this write.
            shutil.rmtree(target.parent / match.group(1), ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        except OSError:
            # Held by a running write (or the file system cannot say), or not ours to remove.
            continue
        finally:
            os.close(descriptor)


def _remove_dead_earlier_staging(target: Path) -> None:
    """Remove the staging folders for ``target`` that killed writes of earlier versions left, named after their writer,
    when that writer is provably gone, by the rule those versions applied: a folder of this host whose pid is not
    alive here, and whose pid namespace is this one. A folder named ``.NAME.tmp-HOST-pidnsINODE-PID-XXXXXXXX`` says
    its namespace; one named ``.NAME.tmp-HOST-PID-XXXXXXXX`` (before namespaces were recorded) does not, and a
    container sharing this hostname but not its pids may be writing it, so it goes only when it was also created
    before this host last booted (its modification time, which its creation cannot follow, is older than the boot
    by more than a minute's clock difference): no process alive now can be writing it. Nothing is judged where the
    namespace or the boot time cannot be read. Other hosts' folders are never judged: their processes cannot be
    seen from here."""
    namespace, booted = _pid_namespace(), _boot_time()
    prefix = f".{target.name}.tmp-{socket.gethostname()}-"
    for entry in target.parent.glob(f"{glob.escape(prefix)}*"):
        # tempfile.mkdtemp's suffix holds no "-": a host whose name merely starts with this one's does not match.
        match = re.fullmatch(r"(?:pidns(\d+)-)?(\d+)-[^-]+", entry.name[len(prefix):])
        if match is None or _process_alive(int(match.group(2))):
            continue
        if match.group(1) is not None:
            dead = namespace is not None and int(match.group(1)) == namespace
        else:
            try:
                dead = booted is not None and entry.lstat().st_mtime < booted - PENDING_GRACE_S
            except OSError:
                continue
        if dead and entry.is_dir() and not entry.is_symlink():
            # A folder that cannot be removed must not fail this write.
            shutil.rmtree(entry, ignore_errors=True)


def _pid_namespace() -> int | None:
    """The inode of this process's pid namespace (Linux), or None where it cannot be read."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _boot_time() -> float | None:
    """When this host booted (seconds since the epoch, Linux), or None where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # It exists, as another user's process.
        return True
    except (OverflowError, ValueError):
        # Not a pid this system can have: nothing is judged.
        return True
    return True
