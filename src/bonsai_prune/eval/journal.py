"""Generation batches already done, on disk: a killed evaluation resumes at its first unfinished
batch.

Evaluating a large model on the whole split is hours of decoding, and a study grid is killed
and restarted many times. ``evaluate(out_dir=...)`` appends each finished batch of greedy
generations to ``out_dir/generations.partial.jsonl``; run again on the same model, settings and
prompts it takes those batches from there. The batches are the same ones (prompts sorted by
length, a fixed size), so the result equals an uninterrupted run's. The first line names what
the batches belong to (the evaluation's config, a digest of the weights, of the prompts): a
journal of anything else is started afresh. A line cut short by the kill is redone. The file
goes once ``generations.jsonl`` is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from bonsai_prune.rundir.files import atomic_write_text

JOURNAL = "generations.partial.jsonl"


def weights_digest(model) -> str:
    """A short digest of ``model``'s parameters (names, shapes, dtypes and float64 sums): tells
    one model's journal from another's without hashing gigabytes."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            total = float(torch.sum(p, dtype=torch.float64))
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{total!r};".encode())
    return digest.hexdigest()[:16]


def text_digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


class BatchJournal:
    """The finished batches of one generation run, keyed by the batch's first position in the
    sorted order (``done``), and the file new ones are appended to."""

    def __init__(self, path: Path, identity: dict) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity))  # as it reads back from the file
        self.done: dict[int, dict] = self._read()
        self._started = bool(self.done)
        if self.done:  # rewritten whole: a line the kill cut short must not prefix the next
            lines = [{"identity": self.identity}, *self.done.values()]
            text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            atomic_write_text(self.path, text)

    def _read(self) -> dict[int, dict]:
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            if json.loads(lines[0]) != {"identity": self.identity}:
                return {}
        except (IndexError, json.JSONDecodeError):
            return {}
        done = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # cut short by the kill: it is redone
            done[entry["start"]] = entry
        return done

    def record(self, start: int, texts, counts, finished, seconds: float) -> None:
        """Append one finished batch (flushed to disk before the next batch starts)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"start": start, "texts": list(texts), "counts": list(counts),
                 "finished": list(finished), "seconds": seconds}  # fmt: skip
        if not self._started:  # a fresh journal: the header first, any stale file replaced
            self.path.write_text(json.dumps({"identity": self.identity}) + "\n", encoding="utf-8")
            self._started = True
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
