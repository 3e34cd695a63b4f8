"""Crash-safe run directories: a run killed at any write point resumes to the same model.

The crash is injected deterministically with ``BONSAI_PRUNE_FAULT`` (see rundir/files.py): the
run sends itself SIGKILL (or SIGINT) at the named write point. A tiny model folder and a 4-problem
data file keep each subprocess to a few seconds.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bonsai_prune.cli import main
from bonsai_prune.rundir import files as rundir_files
from bonsai_prune.rundir.files import FAULT_ENV

ARGS = [
    "prune",
    "--quiet",
    "--sparsity",
    "0.12",
    "--prune-fraction",
    "0.04",
    "--masks-per-round",
    "4",
    "--masks-per-forward",
    "4",
    "--calib-samples",
    "2",
    "--max-length",
    "128",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def run_args(tiny_model_dir, small_data):
    return [*ARGS, "--model", str(tiny_model_dir), "--data", str(small_data)]


def _prune(run_args, out, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    command = [sys.executable, "-m", "bonsai_prune.cli", *run_args, "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, run_args):
    """The uninterrupted run every crashed-and-resumed run must match."""
    out = tmp_path_factory.mktemp("whole") / "run"
    done = _prune(run_args, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["n_rounds"] >= 3
    return out


def _assert_same_run(expected, actual) -> None:
    a = load_file(str(expected / "model" / "model.safetensors"))
    b = load_file(str(actual / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    figures = ("complete", "params_after", "sparsity", "utility_per_round", "n_rounds", "dtype")
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (expected, actual))
    assert {k: rb[k] for k in figures} == {k: ra[k] for k in figures}
    for index in range(1, ra["n_rounds"] + 1):
        name = f"rounds/round_{index:03d}.safetensors"
        ta, tb = load_file(str(expected / name)), load_file(str(actual / name))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    leftovers = [p.name for p in actual.rglob(".*")]
    assert not leftovers, f"temporaries left behind: {leftovers}"


ALL = -1  # every round of the uninterrupted run
SLOW = pytest.mark.slow  # each case is two subprocesses (about 30 s on 2 loaded cores)
# write point -> what the killed run left: (rounds complete, model folder present)
FAULTS = [
    pytest.param("config", 0, False, marks=SLOW),  # the first file of the run not yet in place
    pytest.param("round_tensors@2", 1, False, marks=SLOW),  # round 2's tensors not yet renamed in
    pytest.param("round_json@2", 1, False),  # round 2's tensors in place, its JSON not
    pytest.param("report@2", 2, False, marks=SLOW),  # round 2 complete, report.json not updated
    pytest.param("model_files", ALL, False),  # the model folder written, not yet renamed in
    pytest.param("report_final", ALL, True, marks=SLOW),  # model in, report not marked complete
]


@pytest.mark.parametrize("fault, rounds, has_model", FAULTS)
def test_killed_at_a_write_point_resumes_to_the_same_model(
    tmp_path, run_args, whole, fault, rounds, has_model
):
    out = tmp_path / "run"
    killed = _prune(run_args, out, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if rounds == ALL:
        rounds = json.loads((whole / "report.json").read_text())["n_rounds"]
    assert rounds == 0 or (out / "rounds" / f"round_{rounds:03d}.json").is_file()
    assert not (out / "rounds" / f"round_{rounds + 1:03d}.json").exists()
    assert (out / "model").exists() == has_model
    if rounds:
        assert json.loads((out / "report.json").read_text())["complete"] is False
    else:  # killed before the run's first file: nothing to replay, resume starts it afresh
        assert not (out / "config.json").exists() and list(out.glob(".config.json.*.tmp"))

    resumed = _prune(run_args, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(whole, out)


@pytest.mark.slow
def test_killed_between_model_renames_resumes(tmp_path, run_args, whole):
    """A resumed run replaces an existing model: killed with the old one renamed aside."""
    out = tmp_path / "run"
    assert _prune(run_args, out, fault="report_final").returncode == -signal.SIGKILL
    killed = _prune(run_args, out, "--resume", fault="model_swap")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "model").exists() and list(out.glob(".model.old.*"))
    resumed = _prune(run_args, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(whole, out)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_round_being_written(tmp_path, run_args, whole):
    out = tmp_path / "run"
    stopped = _prune(run_args, out, fault="round_json@2:INT")
    assert stopped.returncode == 130
    assert stopped.stderr.strip().splitlines()[-1] == (
        "bonsai-prune: interrupted; completed rounds (FinerCut: removals) are kept; "
        "rerun with --resume"
    )
    assert (out / "rounds" / "round_002.json").is_file()  # the round finished its files
    assert json.loads((out / "report.json").read_text())["rounds"][-1]["index"] == 2
    resumed = _prune(run_args, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(whole, out)


def test_run_files_are_readable_by_others(whole):
    umask = os.umask(0)
    os.umask(umask)
    for path in [whole, *whole.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == expected, f"{path}: {oct(mode)}"
    report = json.loads((whole / "report.json").read_text())
    assert report["dtype"] in ("fp32", "bf16") and report["device"] == "cpu"


def test_second_process_on_the_same_out_is_refused(tmp_path, capsys, run_args):
    from bonsai_prune.rundir.run import locked

    out = tmp_path / "run"
    with locked(out):  # another process holds it (flock conflicts across open files)
        assert main([*run_args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"bonsai-prune: error: --out {out} is in use by another bonsai-prune process; "
        "wait for it to end or choose another --out"
    )
    assert not any(out.iterdir())


def _full_disk_on_call(monkeypatch, module, name: str, nth: int) -> None:
    """Make ``module.name`` raise ENOSPC from its nth call on."""
    original, calls = getattr(module, name), []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) >= nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, write)


def test_full_disk_in_a_round_keeps_the_rounds_before(tmp_path, capsys, monkeypatch, run_args):
    out = tmp_path / "run"
    _full_disk_on_call(monkeypatch, rundir_files, "save_file", nth=2)  # round 2's tensors
    assert main([*run_args, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in lines if not line.startswith("bonsai-prune: warning:"))
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert "round_002.safetensors" in err
    assert (out / "rounds" / "round_001.json").is_file()
    assert sorted(p.name for p in (out / "rounds").iterdir()) == [
        "round_001.json",
        "round_001.safetensors",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and len(report["rounds"]) == 1


def test_full_disk_during_the_model_save_keeps_the_old_model(tmp_path, capsys, monkeypatch, whole):
    out = tmp_path / "run"
    import shutil

    shutil.copytree(whole, out)
    before = (out / "model" / "model.safetensors").read_bytes()
    report_before = (out / "report.json").read_text()
    _full_disk_on_call(monkeypatch, rundir_files, "fsync_file", nth=1)  # the new model's files
    config = json.loads((out / "config.json").read_text())
    args = [
        "prune",
        "--quiet",
        "--resume",
        "--out",
        str(out),
        "--model",
        config["model"],
        "--data",
        config["data"],
    ]
    args += ARGS[2:]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert (out / "model" / "model.safetensors").read_bytes() == before
    assert (out / "report.json").read_text() == report_before
    assert not list(out.glob(".model.*"))


def test_resume_reuses_the_recorded_dtype(tmp_path):
    from bonsai_prune.api import _run_dtype
    from bonsai_prune.config import PruneConfig
    from bonsai_prune.models.loading import fast_dtype

    (tmp_path / "report.json").write_text(json.dumps({"dtype": "bf16"}))
    auto, fixed = PruneConfig(), PruneConfig(dtype="fp32")
    assert _run_dtype(auto, tmp_path, resume=True) == "bf16"  # not re-resolved on this machine
    assert _run_dtype(auto, tmp_path, resume=False) == fast_dtype("cpu")
    assert _run_dtype(fixed, tmp_path, resume=True) == "fp32"


def test_stale_temporaries_are_removed_and_user_files_kept(tmp_path):
    from bonsai_prune.config import PruneConfig
    from bonsai_prune.errors import RunDirectoryError
    from bonsai_prune.rundir.run import prepare_out_dir

    out = tmp_path / "run"
    (out / "rounds").mkdir(parents=True)
    (out / ".config.json.abc123.tmp").write_text("{")
    (out / "rounds" / ".round_001.safetensors.x1.tmp").write_bytes(b"")
    (out / ".model.new.q9").mkdir()
    with pytest.raises(RunDirectoryError, match="holds no run to resume"):
        prepare_out_dir(out, PruneConfig(), resume=True, overwrite=False)  # rounds/ is there
    assert not list(out.rglob(".*")), "the temporaries were not removed"
    (out / "rounds").rmdir()
    # killed before its first round was saved: resuming starts the run afresh
    assert prepare_out_dir(out, PruneConfig(), resume=True, overwrite=False) == 0

    (out / "notes.tmp").write_text("mine")
    (out / ".notes.txt.tmp").write_text("mine too")  # not a name this layout writes
    with pytest.raises(RunDirectoryError, match="not empty"):
        prepare_out_dir(out, PruneConfig(), resume=False, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == [".notes.txt.tmp", "notes.tmp"]
