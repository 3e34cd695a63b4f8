"""Atomic, durable files: a reader (or a resumed run) never sees half a file.

Every write goes to a uniquely named temporary sibling, is flushed and fsynced, made readable
by others (0644 under the usual umask, as other ML tools write), renamed into place, and the
directory is fsynced so the rename itself survives a power cut. A failed write (a full disk)
raises :class:`RunDirectoryError` naming the file; the previous version stays in place.

Fault injection (tests only): ``BONSAI_PRUNE_FAULT=<point>[@N][:INT]`` makes :func:`fault_point`
kill the process with SIGKILL the N-th time the run reaches that write point (SIGINT with
``:INT``), so a test can crash a run exactly there and check that ``--resume`` recovers. Points
(each reached with the file written under its temporary name, not yet renamed in):
``config``, ``round_tensors``, ``round_json``, ``report`` (after a round), ``checkpoint`` (a
one-shot method's progress), ``model_files`` (the model folder),
``model_swap`` (old model renamed aside, new one not yet in), ``report_final``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bonsai_prune.errors import RunDirectoryError

FAULT_ENV = "BONSAI_PRUNE_FAULT"


def fault_point(name: str) -> None:
    """Crash here if ``BONSAI_PRUNE_FAULT`` names this point (a test hook; a no-op otherwise).

    The value is ``POINT[@N][:INT]``: at the N-th time (default 1) the process reaches POINT it
    sends itself SIGKILL (or SIGINT with ``:INT``).
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, signal_name = wanted.partition(":")
    point, _, nth = point.partition("@")
    if point != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGINT if signal_name == "INT" else signal.SIGKILL)


_FAULT_HITS: dict[str, int] = {}  # the test hook's count of each point reached (this process)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(directory: bool = False) -> int:
    """0644 for files, 0755 for folders, less whatever the user's umask removes."""
    return (0o777 if directory else 0o666) & ~_umask()


def make_readable(path: Path) -> None:
    """Give ``path`` the mode a plain ``open`` or ``mkdir`` would (0644 / 0755 under umask 022):
    temporary files and folders start private (0600 / 0700), and what we write is for sharing."""
    os.chmod(path, public_mode(Path(path).is_dir()))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failed(path: Path, error: OSError) -> RunDirectoryError:
    """A one-line error for a write the operating system refused (full disk, read-only, quota)."""
    reason = error.strerror or str(error)
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    return RunDirectoryError(
        f"cannot write {path}: {reason}; {'free disk space' if full else 'fix it'} or choose "
        "another --out (what was complete before is kept; rerun with --resume where it applies)"
    )


@contextlib.contextmanager
def _temporary_sibling(path: Path, fault: str | None = None) -> Iterator[Path]:
    """A unique temporary name next to ``path``: renamed into place on success, removed on failure.

    ``fault`` names the write point :func:`fault_point` may crash at (written, not yet renamed).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise write_failed(path, e) from None
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        if fault:
            fault_point(fault)
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, fault: str | None = None) -> None:
    """Write to a temporary sibling and rename, so a reader never sees half a file."""
    with _temporary_sibling(path, fault) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, data: Any, *, fault: str | None = None) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", fault=fault)


def atomic_save_tensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict | None = None,
    *,
    fault: str | None = None,
) -> None:
    with _temporary_sibling(path, fault) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata=metadata)


def atomic_write_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Build a folder with ``write(tmp)`` and put it at ``target`` without ever deleting first.

    The new folder is written under a unique temporary name and fsynced; an existing ``target``
    is renamed aside, the new one renamed in, the directory fsynced, and only then is the old
    one removed. A crash at any point leaves either the old or the new folder at ``target``, or
    (between the two renames) the old one beside it under ``.NAME.old.*``: never half of one.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new."))
    except OSError as e:
        raise write_failed(target, e) from None
    aside: Path | None = None
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            os.chmod(file, public_mode(file.is_dir()))
            if file.is_file():
                fsync_file(file)
        os.chmod(tmp, public_mode(directory=True))
        fsync_dir(tmp)
        fault_point("model_files")
        if target.exists():
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, aside)  # an empty folder is replaced by the rename
            fault_point("model_swap")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        _put_back(aside, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(target, e) from None
    except BaseException:
        _put_back(aside, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def _put_back(aside: Path | None, target: Path) -> None:
    if aside is not None and aside.exists() and not target.exists():
        os.replace(aside, target)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt.

    Wraps the writes that make one step durable, so Ctrl-C stops between steps, never inside.
    Outside the main thread (where handlers cannot be set) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirectoryError(f"{path} is missing") from None
    except UnicodeDecodeError:
        raise RunDirectoryError(f"{path} is not valid UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise RunDirectoryError(f"{path} is not valid JSON ({e.msg})") from None
