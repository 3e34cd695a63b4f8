"""Peak memory and step time of recovery steps, whole batches against micro-batches.

    python scripts/recover_memory.py RUN [--micro 0 4 2] [--steps 3] [--dtype auto]

RUN is a pruned run directory. Each setting runs in a fresh process (peak RSS is a process's
high-water mark): the step's 8 longest GSM8K train rows (gold solutions, cut to 384 tokens, the
worst case of the default batch), the dense packaged parent as teacher, the recover defaults'
dtype, freed memory handed back after each step as the trainer does; the first step is a
warm-up and not timed. Beside each: the peak ``recover`` plans for
(``bonsai_prune.recover.step_memory``: RSS once loaded + the probe's step estimate).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(run: str, micro: int, steps: int, dtype: str) -> dict:
    import torch

    from bonsai_prune.config import RecoverConfig
    from bonsai_prune.data.problems import load_gsm8k
    from bonsai_prune.memory import peak_resident_bytes, release_free_memory, resident_bytes
    from bonsai_prune.recover import load_pair
    from bonsai_prune.recover.data import collate, gold_sequences
    from bonsai_prune.recover.step_memory import probe_step_memory
    from bonsai_prune.recover.trainer import accumulate_gradients, micro_batches

    config = RecoverConfig(micro_batch_size=micro, dtype=dtype)
    pair = load_pair(run, "default", config)
    student, tokenizer, teacher = pair.student, pair.tokenizer, pair.teacher
    autocast = pair.autocast
    rows = gold_sequences(tokenizer, load_gsm8k("train")[:400], config.prompt, config.max_length)
    rows = sorted(rows, key=lambda s: -len(s.ids))[: config.batch_size]
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=config.lr, foreach=False
    )
    loaded = resident_bytes()
    rows_at_once = micro if 0 < micro < len(rows) else len(rows)
    memory = probe_step_memory(student, teacher.dtype, config, autocast)
    seconds = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        batches = [collate(part, tokenizer.pad_token_id) for part in micro_batches(rows, micro)]
        accumulate_gradients(student, teacher, batches, config, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        release_free_memory()  # as the trainer does after each step
        seconds.append(time.perf_counter() - began)
    return {
        "micro_batch_size": micro,
        "loaded_rss_gib": loaded / 2**30,
        "predicted_gib": (loaded + memory.step_bytes(rows_at_once)) / 2**30,
        "peak_rss_gib": peak_resident_bytes() / 2**30,
        "step_s": seconds[1:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--micro", type=int, nargs="+", default=[0, 4, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1 (the first step is a warm-up, not timed)")
    if args.one:
        print(json.dumps(measure(args.run, args.micro[0], args.steps, args.dtype)))
        return
    print(
        "| micro-batch | RSS loaded (GiB) | peak RSS (GiB) | predicted peak (GiB) | step s (median) |"
        "\n|---|---|---|---|---|"
    )
    for micro in args.micro:
        command = [sys.executable, __file__, args.run, "--one", "--micro", str(micro)]
        command += ["--dtype", args.dtype]
        out = subprocess.run(
            [*command, "--steps", str(args.steps)], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        step = sorted(row["step_s"])[len(row["step_s"]) // 2]
        print(
            f"| {micro or 'whole (8)'} | {row['loaded_rss_gib']:.2f} | {row['peak_rss_gib']:.2f} "
            f"| {row['predicted_gib']:.2f} | {step:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
