"""Per-step metrics of one arm: ``metrics.jsonl`` (one JSON object per line; ``kind`` is "train" or
"valid") and, when the ``tensorboard`` package is installed, TensorBoard event files in ``tb/``.

The run folder's logs are append-only and every record carries its step, so that `trim_logs` can
cut them back to a checkpoint: a resumed run logs again, once, what the interrupted one logged
after its last checkpoint."""
from __future__ import annotations

import json
import os
from typing import List, Optional

_warned_tb = False

#: dense BF16 tensor-core peak FLOP/s per GPU, by a substring of the device name (vendor data sheets)
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


def peak_flops(device_name: str, dtype) -> Optional[float]:
    """The peak FLOP/s that MFU is counted against: BF16 runs on a GPU listed in `PEAK_BF16_FLOPS`, else None."""
    if "bfloat16" not in str(dtype):
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def read_jsonl(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: ignore it
                    pass
    return out


def trim_logs(run_dir: str, step: Optional[int]) -> None:
    """Cut every ``*.jsonl`` of `run_dir` back to its records of steps <= `step` (none when `step` is
    None: a fresh start), dropping a line cut by a kill; each file is replaced atomically."""
    for name in sorted(os.listdir(run_dir)):
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(run_dir, name)
        keep = [r for r in read_jsonl(path) if step is not None and r["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(path + ".tmp", path)


class MetricsWriter:
    """Appends to ``metrics.jsonl`` (trimmed to `resume_step` by `trim_logs` beforehand) and to TensorBoard
    (its events after `resume_step` purged)."""

    def __init__(self, run_dir: str, resume_step: Optional[int], enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.f = open(self.path, "a")
        if tensorboard:
            self.tb = _tensorboard(os.path.join(run_dir, "tb"), purge_step=0 if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            kind, step = record.get("kind"), record.get("step")
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _tensorboard(logdir: str, purge_step):
    global _warned_tb
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        if not _warned_tb:
            print("note: the tensorboard package is not installed; metrics go to metrics.jsonl only")
            _warned_tb = True
        return None
    return SummaryWriter(logdir, purge_step=purge_step)
