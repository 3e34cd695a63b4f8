"""An offline lm-evaluation-harness GSM8K task on the packaged copy of GSM8K.

lm-eval's own ``gsm8k`` task downloads ``openai/gsm8k``. ``bonsai_gsm8k`` (shipped in
``lmeval_tasks/``) is the same task (v3: 5-shot, strict-match ``#### n``, flexible-extract the
last number) reading local JSONL files. The packaged copy is gzipped and inside the package,
whose location differs per install, so :func:`write_task` writes the YAML and the decompressed
splits into one folder for ``--include_path``. Problems keep file order, so ``--limit N`` sees
the same problems as ``bonsai-prune evaluate --limit N``.

lm-eval's stock task draws different random exemplars for every problem and keeps the
calculator annotations (``<<48/2=24>>``) in them, so its prompt is not the one
``bonsai-prune evaluate --prompt plain --shots K`` writes. ``bonsai_gsm8k_plain`` (written
beside it) is: the same K worked exemplars, in the same order, for every problem
(``fewshot_config: first_n`` over an ``exemplars`` split), and otherwise the stock task
(stops, strict-match, flexible-extract). On it both tools generate the same text, so their
accuracies can be compared problem by problem (``scripts/lmeval_agreement.py``).

``bonsai_gsm8k_chat`` is the prompt of ``bonsai-prune evaluate`` by default (``--prompt chat
--shots 0``, the study's): the problem after this project's instruction as one user turn, run
with ``lm_eval --apply_chat_template`` so the model's own chat template wraps it, and generation
until the end of the assistant's turn (our chat evaluation stops only there).
"""

from __future__ import annotations

import gzip
import json
import shutil
from importlib import resources
from pathlib import Path

from bonsai_prune.data.prompts import INSTRUCTION, exemplars, worked_solution
from bonsai_prune.rundir.files import atomic_write_text, make_readable

TASK_NAME = "bonsai_gsm8k"
SAME_PROMPT_TASK = "bonsai_gsm8k_plain"  # the prompt of `evaluate --prompt plain --shots K`
CHAT_TASK = "bonsai_gsm8k_chat"  # the prompt of `evaluate` (chat, zero-shot), --apply_chat_template
SPLITS = ("train", "test")
DEFAULT_SHOTS = 5  # lm-eval's gsm8k is 5-shot


def task_template() -> str:
    """The shipped task YAML, with ``{data_dir}`` where the data folder goes."""
    return (Path(__file__).parent / "lmeval_tasks" / f"{TASK_NAME}.yaml").read_text("utf-8")


def _rewrite(text: str, edits: tuple[tuple[str, str], ...]) -> str:
    """Apply ``edits`` (old, new) to the shipped template once each; a missing ``old`` means the
    template changed, so fail loudly rather than write a silent stock task."""
    for old, new in edits:
        if old not in text:
            raise RuntimeError(f"{TASK_NAME}.yaml has no {old.strip()!r} to rewrite")
        text = text.replace(old, new, 1)
    return text


def _with_header(text: str, task: str, header: str) -> str:
    """``header`` in place of the shipped file's comment block (which describes the stock task)."""
    return header + text[text.index(f"\ntask: {task}\n") + 1 :]


def same_prompt_template(shots: int) -> str:
    """The stock task turned into ``bonsai_gsm8k_plain``: our ``shots`` exemplars, first_n."""
    if shots < 1:
        raise ValueError(f"shots must be at least 1 for {SAME_PROMPT_TASK}, got {shots}")
    edits = (
        (f"task: {TASK_NAME}\n", f"task: {SAME_PROMPT_TASK}\n"),
        (
            '    test: "{data_dir}/test.jsonl"\n',
            f'    test: "{{data_dir}}/test.jsonl"\n    exemplars: "{{data_dir}}/exemplars_{shots}.jsonl"\n',
        ),
        (
            "fewshot_split: train\n",
            "fewshot_split: exemplars\nfewshot_config:\n  sampler: first_n\n",
        ),
        ("num_fewshot: 5\n", f"num_fewshot: {shots}\n"),
    )
    header = (
        f"# {SAME_PROMPT_TASK}: the stock task with the {shots} fixed worked exemplars of\n"
        f"# `bonsai-prune evaluate --prompt plain --shots {shots}` (see lmeval.py).\n"
    )
    return _with_header(_rewrite(task_template(), edits), SAME_PROMPT_TASK, header)


def chat_template_task() -> str:
    """The stock task turned into ``bonsai_gsm8k_chat``: zero-shot, our instruction before the
    problem, generation until the end of the turn (run it with ``--apply_chat_template``)."""
    doc_to_text = json.dumps(f"{INSTRUCTION}\n\n{{{{question}}}}")  # JSON: a YAML string
    edits = (
        (f"task: {TASK_NAME}\n", f"task: {CHAT_TASK}\n"),
        (
            'doc_to_text: "Question: {{question}}\\nAnswer:"\n',
            f"doc_to_text: {doc_to_text}\n",
        ),
        ('    - "Question:"\n    - "</s>"\n    - "<|im_end|>"\n', '    - "<|im_end|>"\n'),
        ("num_fewshot: 5\n", "num_fewshot: 0\n"),
    )
    header = (
        f"# {CHAT_TASK}: the prompt of `bonsai-prune evaluate` (chat, zero-shot; see lmeval.py).\n"
        "# Run with lm_eval --apply_chat_template.\n"
    )
    return _with_header(_rewrite(task_template(), edits), CHAT_TASK, header)


def write_task(folder: str | Path, shots: int = DEFAULT_SHOTS) -> Path:
    """Write ``bonsai_gsm8k.yaml``, ``bonsai_gsm8k_plain.yaml`` (``shots`` fixed exemplars),
    ``bonsai_gsm8k_chat.yaml`` and the GSM8K JSONL they read into ``folder``; return the folder
    (for ``lm_eval --include_path``)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        source = resources.files("bonsai_prune") / "data" / "gsm8k" / f"{split}.jsonl.gz"
        target = folder / f"{split}.jsonl"
        tmp = folder / f".{split}.jsonl.tmp"
        with source.open("rb") as raw, gzip.open(raw, "rb") as f, tmp.open("wb") as out:
            shutil.copyfileobj(f, out)
        make_readable(tmp)
        tmp.replace(target)
    shot_lines = [
        json.dumps({"question": p.question, "answer": worked_solution(p)}) for p in exemplars(shots)
    ]
    atomic_write_text(folder / f"exemplars_{shots}.jsonl", "\n".join(shot_lines) + "\n")
    for name, template in (
        (TASK_NAME, task_template()),
        (SAME_PROMPT_TASK, same_prompt_template(shots)),
        (CHAT_TASK, chat_template_task()),
    ):
        atomic_write_text(
            folder / f"{name}.yaml", template.replace("{data_dir}", folder.as_posix())
        )
    return folder


def lm_eval_command(
    model_folder: str | Path,
    task_folder: str | Path,
    limit: int | None = None,
    task: str = TASK_NAME,
) -> list[str]:
    """The ``lm_eval`` command line that scores ``model_folder`` on the offline task (the chat
    task with the model's chat template)."""
    command = [
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={Path(model_folder).resolve()},trust_remote_code=True",
        "--include_path",
        str(Path(task_folder).resolve()),
        "--tasks",
        task,
        "--batch_size",
        "1",
    ]
    if task == CHAT_TASK:
        command.append("--apply_chat_template")
    return command + (["--limit", str(limit)] if limit is not None else [])
