"""The recovery token stream: GSM8K train problems as prompt + solution sequences.

Solutions are the gold worked answers, the dense parent's own greedy answers (self-data
distillation, arXiv 2410.09982), or both. The test split is never read here. The loss falls on
solution tokens only; each solution ends with the tokenizer's EOS so the student also learns
where the parent stops (generation in evaluation stops on its own).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from bonsai_prune.data.problems import Problem
from bonsai_prune.data.prompts import format_prompt, worked_solution
from bonsai_prune.errors import DataError
from bonsai_prune.rundir.files import atomic_write_text
from bonsai_prune.utility.generation import end_of_sequence, greedy_sequences, stop_token_ids


@dataclass(frozen=True)
class Sequence:
    """One training row: token ids of prompt + solution (+ EOS); the first n_prompt are prompt."""

    ids: tuple[int, ...]
    n_prompt: int


@dataclass
class TokenBatch:
    """Right-padded rows ready for a forward pass."""

    input_ids: torch.Tensor  # (b, L)
    attention_mask: torch.Tensor  # (b, L)
    target_mask: torch.Tensor  # (b, L) bool: positions whose next token is a solution token
    n_tokens: int  # real (non-pad) tokens, what the budget counts

    @property
    def labels(self) -> torch.Tensor:
        """(n_scored,) the next token at each target position."""
        return torch.roll(self.input_ids, shifts=-1, dims=1)[self.target_mask]


def split_held_out(
    problems: list[Problem], n_eval: int, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """``(train, held_out)``: a seeded draw of ``n_eval`` problems kept out of training."""
    if n_eval >= len(problems):
        raise DataError(f"n_eval {n_eval} leaves no training problems out of {len(problems)}")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [p for i, p in enumerate(problems) if i not in held], [
        problems[i] for i in order[:n_eval]
    ]


def encode(tokenizer, problem: Problem, solution: str, prompt: str, max_length: int) -> Sequence:
    """Prompt in the project's format (prompts.format_prompt), then the solution and EOS."""
    prompt_ids = tokenizer(
        format_prompt(tokenizer, problem.question, prompt), add_special_tokens=False
    )["input_ids"]
    solution_ids = tokenizer(solution.strip(), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + solution_ids + [tokenizer.eos_token_id])[:max_length]
    return Sequence(tuple(ids), min(len(prompt_ids), len(ids) - 1))


def gold_sequences(
    tokenizer, problems: list[Problem], prompt: str, max_length: int, max_tokens: int | None = None
) -> list[Sequence]:
    """Gold worked solutions of ``problems`` in order, stopping once ``max_tokens`` are covered
    (tokenising all 7,473 train problems for a small budget would be wasted)."""
    sequences, spent = [], 0
    for p in problems:
        if max_tokens is not None and spent >= max_tokens:
            break
        sequences.append(encode(tokenizer, p, worked_solution(p), prompt, max_length))
        spent += len(sequences[-1].ids)
    return sequences


def plan_batches(
    lengths: list[int], batch_size: int, max_tokens: int, seed: int, bucket: int = 8
) -> list[list[int]]:
    """Row indices of each step, drawn without replacement per epoch, until the budget is spent.

    Pure and seeded, so a resumed run replays exactly the batches an uninterrupted run sees;
    the last step may pass the budget by less than one batch. Within each window of
    ``bucket`` batches, rows are grouped by length (then the window's batches shuffled): GSM8K
    rows run from about 120 to 380 tokens, and a right-padded batch computes its longest row's
    width for every row.
    """
    if not lengths:
        raise DataError("no training sequences")
    rng = random.Random(seed)
    batches, spent = [], 0
    while spent < max_tokens:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        window = batch_size * bucket
        for start in range(0, len(order), window):
            rows = sorted(order[start : start + window], key=lambda i: lengths[i])
            group = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
            rng.shuffle(group)
            for batch in group:
                taken = []
                for i in batch:
                    taken.append(i)
                    spent += lengths[i]
                    if spent >= max_tokens:
                        break
                batches.append(taken)
                if spent >= max_tokens:
                    return batches
    return batches


def collate(sequences: list[Sequence], pad_id: int) -> TokenBatch:
    """Right-pad ``sequences``; mark the positions that predict a solution token."""
    width = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    target = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s.ids)] = torch.tensor(s.ids)
        attention[row, : len(s.ids)] = 1
        target[row, s.n_prompt - 1 : len(s.ids) - 1] = True  # position t predicts token t+1
    return TokenBatch(input_ids, attention, target, int(attention.sum()))


def _key(problem: Problem) -> str:
    return hashlib.sha256(problem.question.encode("utf-8")).hexdigest()[:16]


def read_self_cache(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out[row["key"]] = row["solution"]
    return out


@torch.no_grad()
def self_sequences(
    teacher,
    tokenizer,
    problems: list[Problem],
    *,
    prompt: str,
    max_length: int,
    max_new_tokens: int,
    max_tokens: int,
    cache: Path,
    shared: Path | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Sequence]:
    """The parent's greedy solutions, generated in ``problems`` order until ``max_tokens`` are
    covered, cached in ``cache`` (JSONL, rewritten atomically per batch) and reused on resume.

    shared, optional: a cache of the same parent's solutions kept across runs
    (``shared_self_cache``): what it holds is not generated again, and what is generated is
    added to it. The parent's solutions do not depend on the pruned model, so every model
    pruned from one parent reuses them (about 17 minutes of generation on 2 cores).
    Returns one Sequence per problem covered, in ``problems`` order.
    """
    from tqdm.auto import tqdm

    solved = {**(read_self_cache(shared) if shared else {}), **read_self_cache(cache)}
    sequences, spent = [], 0
    bar = tqdm(total=max_tokens, desc="self data", unit="tok", disable=not progress)
    start = 0
    while spent < max_tokens and start < len(problems):
        chunk = problems[start : start + batch_size]
        start += batch_size
        missing = [p for p in chunk if _key(p) not in solved]
        if missing:
            made = _generate(teacher, tokenizer, missing, prompt, max_new_tokens)
            solved.update(made)
            if shared is not None:  # re-read: another run may have added to it meanwhile
                _write_self_cache(shared, {**read_self_cache(shared), **made})
            used = {_key(q) for q in problems[:start]}  # a killed run resumes from here
            _write_self_cache(cache, {k: v for k, v in solved.items() if k in used})
        for p in chunk:
            seq = encode(tokenizer, p, solved[_key(p)], prompt, max_length)
            sequences.append(seq)
            spent += len(seq.ids)
            bar.update(len(seq.ids))
    bar.close()
    used = {_key(p) for p in problems[:start]}
    if set(read_self_cache(cache)) != used:  # all of it came from the shared cache
        _write_self_cache(cache, {k: v for k, v in solved.items() if k in used})
    return sequences


def shared_self_cache(
    root: Path, teacher: Path | str, prompt: str, max_new_tokens: int, dtype: str
) -> Path:
    """Where the solutions of one parent (its files, by name, size and time), prompt, cap and
    dtype are kept across runs: ``root/<hash>.jsonl``."""
    ident: list[str] = [str(teacher), prompt, str(max_new_tokens), dtype]
    folder = Path(teacher)
    if folder.is_dir():
        for f in sorted([*folder.glob("*.safetensors"), *folder.glob("model/*.safetensors")]):
            stat = f.stat()
            ident.append(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(ident).encode("utf-8")).hexdigest()[:20]
    return root / f"{digest}.jsonl"


def _write_self_cache(path: Path, solved: dict[str, str]) -> None:
    lines = [json.dumps({"key": k, "solution": v}) for k, v in solved.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


def _generate(teacher, tokenizer, problems, prompt: str, max_new_tokens: int) -> dict[str, str]:
    texts = [format_prompt(tokenizer, p.question, prompt) for p in problems]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    device = next(teacher.parameters()).device
    out = greedy_sequences(
        teacher,
        enc["input_ids"].to(device),
        enc["attention_mask"].to(device),
        max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        stop=end_of_sequence(stop_token_ids(teacher, tokenizer)),
    )
    new = out[:, enc["input_ids"].shape[1] :]  # (b, T) generated tokens only
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    return {_key(p): text.strip() for p, text in zip(problems, decoded, strict=True)}
