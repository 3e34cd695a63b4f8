"""``--workers N``: N local worker processes (spawn), each holding one model replica.

Messages are pickled by ``pickle`` and sent as bytes over one pipe per worker, so tensors are
copied, never shared with the driver (the driver slices its model in place between rounds).
A worker that dies (killed, out of memory, crashed) is seen through its process sentinel or
its closed pipe; the scheduler re-runs its chunks elsewhere.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from bonsai_prune.distributed.pool import (
    Died,
    Done,
    Replica,
    ReplicaSpec,
    RoundState,
    WorkerRecord,
)
from bonsai_prune.errors import PruningError

WAIT_S = 1.0  # how often the driver looks at the workers' sentinels when nothing arrives


def _worker_main(conn: Connection, spec: ReplicaSpec, device: str, n_threads: int) -> None:
    """A worker process: build the replica, then answer state and chunk messages until None."""
    try:
        replica = Replica(spec, device, n_threads)
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message is None:
                return
            kind, *args = message
            if kind == "state":
                replica.sync(args[0])
            else:  # "job"
                task, job = args
                conn.send_bytes(pickle.dumps(("done", task, replica.run(job))))
    except (EOFError, KeyboardInterrupt):
        return  # the driver went away
    except BaseException:  # reported to the driver, which raises it: not a fault to re-run
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    sent: WorkerRecord = field(default_factory=WorkerRecord)


class LocalBackend:
    """Worker processes on this machine; worker i uses ``devices[i % len(devices)]``."""

    def __init__(
        self, n_workers: int, spec: ReplicaSpec, devices: list[str], n_threads: int, snapshot=None
    ) -> None:
        self.snapshot = snapshot  # the TemporaryDirectory build_model reads: removed on close
        self.n_workers = n_workers
        self.spec = spec
        self.devices, self.n_threads = devices, n_threads
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.slots: dict[int, int] = {}  # worker id -> slot (its device)
        self.next_id = 0
        self.start_missing()

    def start_missing(self) -> int:
        used = set(self.slots[w] for w in self.workers)
        missing = [slot for slot in range(self.n_workers) if slot not in used]
        for slot in missing:
            parent, child = self.context.Pipe()
            process = self.context.Process(
                target=_worker_main,
                args=(child, self.spec, self.devices[slot % len(self.devices)], self.n_threads),
                name=f"bonsai-worker-{slot}",
                daemon=True,
            )
            process.start()
            child.close()  # the worker's end lives in the worker only: its death closes the pipe
            self.workers[self.next_id] = _Worker(process, parent)
            self.slots[self.next_id] = slot
            self.next_id += 1
        return len(missing)

    def live(self) -> list[int]:
        return list(self.workers)

    def pid(self, worker: int) -> int:
        return self.workers[worker].process.pid

    def submit(self, worker: int, task: int, state: RoundState | None, job: tuple) -> None:
        record = self.workers[worker]
        try:
            sent = record.sent.outgoing(state)
            if sent is not None:
                record.conn.send_bytes(pickle.dumps(("state", sent)))
            record.conn.send_bytes(pickle.dumps(("job", task, job)))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # dead: wait() reports it through the sentinel, and its chunks are re-run

    def wait(self):
        by_handle = {}
        for worker, record in self.workers.items():
            by_handle[record.conn] = worker
            by_handle[record.process.sentinel] = worker
        events, dead, seen = [], set(), set()
        for handle in wait(list(by_handle), timeout=WAIT_S):
            worker = by_handle[handle]
            if worker in seen:
                continue
            seen.add(worker)
            record = self.workers[worker]
            try:  # read what it sent before looking at its death: an error message comes first
                while record.conn.poll():
                    kind, *args = pickle.loads(record.conn.recv_bytes())
                    if kind == "error":
                        raise PruningError(f"worker {self.slots[worker]} failed:\n{args[0]}")
                    events.append(Done(worker, args[0], args[1]))
            except (EOFError, OSError):
                dead.add(worker)
            if not record.process.is_alive():
                dead.add(worker)
        for worker in dead:
            record = self.workers.pop(worker)
            code = record.process.exitcode
            record.conn.close()
            record.process.join(timeout=1)
            events.append(Died(worker, f"exit code {code}"))
            del self.slots[worker]
        return events

    def close(self) -> None:
        for record in self.workers.values():
            try:
                record.conn.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        for record in self.workers.values():
            record.process.join(timeout=10)
            if record.process.is_alive():
                record.process.kill()
                record.process.join()
            record.conn.close()
        self.workers.clear()
        self.slots.clear()
        if self.snapshot is not None:
            self.snapshot.cleanup()


def threads_per_worker(n_workers: int) -> int:
    """The cores this process may use, shared evenly among the workers (at least one each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // n_workers)
