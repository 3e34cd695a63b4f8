"""Checks on what users hand in (files, model folders), made where it enters the library.

Each check raises a :class:`BonsaiPruneError` subclass whose message names the file, the problem
and the fix on one line, before any work starts, so a bad input never ends in a traceback or in
an output that looks complete. Numbers and names are checked by the configs (``config.py``) and
the registries (``api.check_registered``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from bonsai_prune.errors import DataError, ModelLoadError, RunDirectoryError


def read_text_lines(path: str | Path, what: str, fix: str) -> list[str]:
    """The lines of a UTF-8 text file; a missing, unreadable or non-UTF-8 file raises DataError.

    what: how the message names the file ("data file"); fix: what to give instead.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; give {fix}")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file; give {fix}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{what} {path} is not valid UTF-8 (line {line}, byte {e.start}: "
            f"{raw[e.start : e.start + 1]!r}); save it as UTF-8 and rerun"
        ) from None
    return text.splitlines()


def check_model_folder(path: Path) -> None:
    """A local model folder must have a readable config.json and intact safetensors files.

    Every ``*.safetensors`` header is read (a few KB, no weights) and its declared tensor data
    compared with the file's size, so a truncated or corrupt file is refused here instead of
    failing deep inside transformers.
    """
    path = Path(path)
    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(
            f"{config} is not valid JSON; restore the model folder from its source"
        ) from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {config}: {e.strerror or e}") from None
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ModelLoadError(
                f"{file} is {problem}; the copy is damaged: copy or save the model again"
            )


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file ("truncated ..."), or None if its layout holds."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"truncated ({size} bytes, no header)"
            (n_header,) = struct.unpack("<Q", prefix)
            if n_header > size - 8:
                return f"truncated ({size} bytes; its header alone declares {n_header})"
            header = json.loads(f.read(n_header))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    needed = 8 + n_header + max(ends, default=0)
    if needed > size:
        return f"truncated ({size} of {needed} bytes)"
    return None


def check_out_dir(path: str | Path) -> None:
    """``--out`` for a folder of outputs: not a file, and somewhere this user may write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"--out {path} is a file; give a directory")
    _check_writable(path)


def check_out_file(path: str | Path) -> None:
    """``--out`` for one output file: not a folder, and somewhere this user may write."""
    path = Path(path)
    if path.is_dir():
        raise RunDirectoryError(f"--out {path} is a folder; give a file name")
    _check_writable(path.parent if not path.exists() else path)


def _check_writable(path: Path) -> None:
    """The nearest existing folder at or above ``path`` must be writable (checked before work)."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if existing.is_file() and existing != path.absolute():
        raise RunDirectoryError(f"--out {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise RunDirectoryError(
            f"--out {path}: no permission to write in {existing}; choose another --out"
        )
