"""The run directory: safetensors and JSON only (no pickle), every file written atomically.

Layout::

    OUT/
      config.json            the PruneConfig of the run
      report.json            figures of the run; "complete": true only once it has finished
      rounds/round_001.safetensors   keep masks sampled, utilities, beta, kept units
      rounds/round_001.json          the round's figures
      checkpoint.json        a long one-shot method's progress (FinerCut: the sub-layers
                             removed so far), so --resume continues it
      model/                 the pruned model (HF files + bonsai_structure.json) and tokenizer

Loading never executes code from the directory: configs are JSON, tensors are safetensors.
One process at a time holds a run directory (:func:`locked`, an flock on the directory itself,
so no lock file is left behind); what a killed writer left (``.*.tmp``, ``.model.new.*``) is
removed when the next process takes the directory (they carry this layout's names only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from bonsai_prune.config import PruneConfig
from bonsai_prune.errors import RunDirectoryError
from bonsai_prune.models.pruned import MODEL_DIR
from bonsai_prune.rundir.files import (
    atomic_save_tensors,
    atomic_write_json,
    read_json,
    write_failed,
)
from bonsai_prune.utility.references import SELF_REFERENCES_FILE

CHECKPOINT_FILE = "checkpoint.json"
RUN_ENTRIES = (
    "config.json",
    "report.json",
    "rounds",
    "keep.safetensors",
    CHECKPOINT_FILE,
    MODEL_DIR,
    SELF_REFERENCES_FILE,
)


def round_path(out: Path, index: int, suffix: str) -> Path:
    return Path(out) / "rounds" / f"round_{index:03d}.{suffix}"


def save_round(out: Path, index: int, tensors: dict[str, torch.Tensor], figures: dict) -> None:
    """Tensors first, then the JSON: a round counts as done only when its JSON exists
    (both fsynced, with their directory, before it does)."""
    atomic_save_tensors(round_path(out, index, "safetensors"), tensors, fault="round_tensors")
    atomic_write_json(round_path(out, index, "json"), figures, fault="round_json")


def load_round(out: Path, index: int) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(round_path(out, index, "safetensors"))), read_json(
        round_path(out, index, "json")
    )


def save_checkpoint(out: Path, state: dict) -> None:
    """Replace the method's checkpoint (JSON-safe ``state``) in one atomic write."""
    atomic_write_json(Path(out) / CHECKPOINT_FILE, state, fault="checkpoint")


def load_checkpoint(out: Path) -> dict | None:
    """The checkpoint a run in ``out`` last saved, or None."""
    path = Path(out) / CHECKPOINT_FILE
    return read_json(path) if path.is_file() else None


def completed_rounds(out: Path) -> int:
    """How many consecutive rounds, from the first, have both their files."""
    n = 0
    while (
        round_path(out, n + 1, "json").is_file() and round_path(out, n + 1, "safetensors").is_file()
    ):
        n += 1
    return n


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``out`` (created if missing) for this process; a second process is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file; give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise write_failed(out, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryError(
                f"--out {out} is in use by another bonsai-prune process; wait for it to end "
                "or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_stale_temporaries(out: Path) -> None:
    """Delete what a killed writer of this run left (only this layout's temporary names:
    ``.report.json.*.tmp``, ``rounds/.round_*.tmp``, ``.model.new.*``, ``.model.old.*``)."""
    out = Path(out)
    stale = [out.glob(f".{name}.*.tmp") for name in RUN_ENTRIES]
    stale += [out.glob(f".{MODEL_DIR}.new.*"), out.glob(f".{MODEL_DIR}.old.*")]
    stale += [(out / "rounds").glob(".round_*.tmp")]
    for entry in [path for paths in stale for path in paths]:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def recorded_dtype(out: Path) -> str | None:
    """The dtype an earlier run in ``out`` actually used (report.json), if it recorded one."""
    path = Path(out) / "report.json"
    if not path.is_file():
        return None
    dtype = read_json(path).get("dtype")
    return dtype if isinstance(dtype, str) else None


def prepare_out_dir(out: Path, config: PruneConfig, *, resume: bool, overwrite: bool) -> int:
    """Make ``out`` ready for this run; return how many completed rounds it already holds.

    A non-empty directory is refused unless the user resumes (same config) or overwrites;
    overwriting removes only the entries a run writes, nothing else the user keeps there.
    Temporaries a killed writer left are removed first; resuming a run killed before its
    first round was saved (no config.json yet, nothing else there) starts it afresh.
    """
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file; give a directory")
    if out.is_dir():
        remove_stale_temporaries(out)  # ours by name; we hold the directory's lock
    if resume and not (out / "config.json").is_file():
        if out.is_dir() and any(out.iterdir()):
            raise RunDirectoryError(f"--resume: {out} holds no run to resume (no config.json)")
        resume = False  # killed before its first round was saved: the run starts from round 1
    if resume:
        saved = PruneConfig.from_saved(read_json(out / "config.json"))
        if saved != config:
            changed = sorted(k for k, v in saved.to_dict().items() if config.to_dict()[k] != v)
            raise RunDirectoryError(
                f"--resume: {out} was started with different settings ({', '.join(changed)}); "
                "resume with the same command, or use a new --out"
            )
        return completed_rounds(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RunDirectoryError(
                f"--out {out} is not empty; pass --resume to continue its run or --overwrite to replace it"
            )
        for name in RUN_ENTRIES:
            entry = out / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return 0
