"""An offline lm-evaluation-harness GSM8K task on the packaged copy of GSM8K.

lm-eval's own ``gsm8k`` task downloads ``openai/gsm8k``. ``bonsai_gsm8k`` (shipped in
``lmeval_tasks/``) is the same task (v3: 5-shot, strict-match ``#### n``, flexible-extract the
last number) reading local JSONL files. The packaged copy is gzipped and inside the package,
whose location differs per install, so :func:`write_task` writes the YAML and the decompressed
splits into one folder for ``--include_path``. Problems keep file order, so ``--limit N`` sees
the same problems as ``bonsai-prune evaluate --limit N``.
"""

from __future__ import annotations

import gzip
import shutil
from importlib import resources
from pathlib import Path

from bonsai_prune.rundir.files import atomic_write_text, make_readable

TASK_NAME = "bonsai_gsm8k"
SPLITS = ("train", "test")


def task_template() -> str:
    """The shipped task YAML, with ``{data_dir}`` where the data folder goes."""
    return (Path(__file__).parent / "lmeval_tasks" / f"{TASK_NAME}.yaml").read_text("utf-8")


def write_task(folder: str | Path) -> Path:
    """Write ``bonsai_gsm8k.yaml`` and GSM8K train/test JSONL into ``folder``; return the folder
    (give it to ``lm_eval --include_path``)."""
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
    yaml = task_template().replace("{data_dir}", folder.as_posix())
    atomic_write_text(folder / f"{TASK_NAME}.yaml", yaml)
    return folder


def lm_eval_command(
    model_folder: str | Path, task_folder: str | Path, limit: int | None = None
) -> list[str]:
    """The ``lm_eval`` command line that scores ``model_folder`` on the offline task."""
    command = [
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={Path(model_folder).resolve()},trust_remote_code=True",
        "--include_path",
        str(Path(task_folder).resolve()),
        "--tasks",
        TASK_NAME,
        "--batch_size",
        "1",
    ]
    return command + (["--limit", str(limit)] if limit is not None else [])
