"""A run interrupted mid-way (Ctrl-C, SIGKILL) and started again with the same command ends with the
logs of an uninterrupted run: every append-only log is cut back to the last checkpoint on resume,
a line torn by the kill included. Ctrl-C prints one line saying where that checkpoint is."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from train_helpers import SMALL

from megatron_mxfp4.train.cli import main
from megatron_mxfp4.train.metrics import read_jsonl

ARMS = ("bf16", "mxfp4-rht-sr")
# checkpoints after steps 1, 3, 5; diagnostics on even steps; dropout and SR/RHT draw random numbers
COMMON = ["--arms", ",".join(ARMS), "--steps", "6", "--save-interval", "2", "--eval-interval", "2",
          "--diagnostics-interval", "2", "--dropout", "0.1", *SMALL]
HOLD = 4  # the interrupted process waits after logging step 4 of the MXFP4 arm (last checkpoint: step 3)

# mxfp4-train in a child process that waits, after logging step HOLD of the MXFP4 arm, for the test's
# signal: the signal lands after a checkpoint and with records logged past it, on every machine
CHILD = f"""
import sys, time
from megatron_mxfp4.train import metrics
write = metrics.MetricsWriter.write
def write_then_wait(self, record):
    write(self, record)
    if "{ARMS[1]}-s1" in self.path and record["kind"] == "train" and record["step"] == {HOLD}:
        time.sleep(600)
metrics.MetricsWriter.write = write_then_wait
from megatron_mxfp4.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data, megatron_cpu):
    out = str(tmp_path_factory.mktemp("reference") / "run")
    assert main(["--data-path", small_data, *COMMON, "--out", out]) == 0
    return out


def _logs(run_dir):
    """The run's records, without the wall-clock fields."""
    clock = ("step_time", "tokens_per_s")
    return {name: [{k: v for k, v in r.items() if k not in clock} for r in read_jsonl(os.path.join(run_dir, name))]
            for name in sorted(os.listdir(run_dir)) if name.endswith(".jsonl")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_run_resumes_to_the_logs_of_an_uninterrupted_one(sig, tmp_path, small_data, reference,
                                                                      megatron_cpu, capsys):
    out = str(tmp_path / "run")
    args = ["--data-path", small_data, *COMMON, "--out", out]
    run = os.path.join(out, f"{ARMS[1]}-s1")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK", "WORLD_SIZE")}
    with open(tmp_path / "stderr", "w+") as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.DEVNULL,
                                 stderr=err, text=True)
        try:
            deadline = time.time() + 300
            while not any(r["kind"] == "train" and r["step"] == HOLD
                          for r in read_jsonl(os.path.join(run, "metrics.jsonl"))):
                assert child.poll() is None and time.time() < deadline, open(tmp_path / "stderr").read()
                time.sleep(0.05)
            child.send_signal(sig)
            rc = child.wait(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
        err.seek(0)
        stderr = err.read()
    ckpt = os.path.join(run, "ckpt", "iter_0000003")
    if sig == signal.SIGINT:
        assert rc == 130
        assert stderr.splitlines() == [f"mxfp4-train: interrupted; last checkpoint {ckpt} (step 3); run the same "
                                       "command to resume from it"]  # one line: no traceback, no warnings
    else:
        assert rc == -signal.SIGKILL
        for name in ("metrics.jsonl", "diagnostics.jsonl"):  # a record cut by the kill
            with open(os.path.join(run, name), "a") as f:
                f.write(json.dumps({"kind": "train", "step": HOLD + 1, "loss": 1.0})[:25])
    assert open(os.path.join(run, "ckpt", "latest")).read().strip() == "3"
    logged = _logs(run)
    assert max(r["step"] for r in logged["metrics.jsonl"]) == HOLD  # logged past the checkpoint ...
    assert max(r["step"] for r in logged["diagnostics.jsonl"]) == HOLD
    assert os.path.exists(os.path.join(out, f"{ARMS[0]}-s1", "done.json"))

    assert main(args) == 0  # ... and the same command resumes
    capsys.readouterr()
    for arm in ARMS:
        ref, got = os.path.join(reference, f"{arm}-s1"), os.path.join(out, f"{arm}-s1")
        assert _logs(got) == _logs(ref), arm
        done_ref, done_got = (json.load(open(os.path.join(d, "done.json"))) for d in (ref, got))
        assert (done_got["final_val_loss"], done_got["final_train_loss"]) == \
            (done_ref["final_val_loss"], done_ref["final_train_loss"])
    assert len(_logs(run)["diagnostics.jsonl"]) == 3 * 8  # steps 0, 2, 4 x 4 linears x (dgrad, wgrad), once each


def test_trim_logs_keeps_the_records_up_to_the_checkpoint(tmp_path):
    from megatron_mxfp4.train.metrics import trim_logs

    lines = [json.dumps({"kind": "train", "step": s, "loss": 1 / (s + 1)}) + "\n" for s in range(6)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + lines[0][:20])  # a line torn by a kill
    (tmp_path / "diagnostics.jsonl").write_text("".join(lines[::2]))
    (tmp_path / "notes.txt").write_text("kept\n")
    trim_logs(str(tmp_path), 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:4])  # the same bytes, up to step 3
    assert (tmp_path / "diagnostics.jsonl").read_text() == lines[0] + lines[2]
    assert (tmp_path / "notes.txt").read_text() == "kept\n"
    trim_logs(str(tmp_path), None)  # a fresh start: nothing is kept
    assert (tmp_path / "metrics.jsonl").read_text() == "" and (tmp_path / "diagnostics.jsonl").read_text() == ""
    assert sorted(os.listdir(tmp_path)) == ["diagnostics.jsonl", "metrics.jsonl", "notes.txt"]


class _Payload:
    """Pickles as a call of os.system: what a tampered checkpoint could hold."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path, small_data, megatron_cpu, capsys):
    import torch

    out, marker = tmp_path / "run", tmp_path / "code-ran"
    ckpt = out / "bf16-s1" / "ckpt"
    (ckpt / "iter_0000001").mkdir(parents=True)
    torch.save({"step": 1, "model": _Payload(f"touch {marker}"), "tp": 1}, ckpt / "iter_0000001" / "tp00.pt")
    (ckpt / "latest").write_text("1\n")
    assert main(["--data-path", small_data, "--arms", "bf16", "--steps", "4", "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mxfp4-train: error: refusing to load checkpoint {ckpt / 'iter_0000001' / 'tp00.pt'}: it holds a "
                   f"reference to {os.system.__module__}.system, which a run state never does, and unpickling it "
                   "could run code; delete it, or the arm's folder, to train that arm afresh"]
    assert not marker.exists()
