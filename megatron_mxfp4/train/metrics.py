"""Per-step metrics of one arm: ``metrics.jsonl`` (one JSON object per line; ``kind`` is "train" or
"valid") and, when the ``tensorboard`` package is installed, TensorBoard event files in ``tb/``.
On resume, records after the checkpoint's step are dropped before appending."""
from __future__ import annotations

import json
import os
from typing import List, Optional

_warned_tb = False


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


class MetricsWriter:
    def __init__(self, run_dir: str, resume_step: Optional[int], enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        keep = [r for r in read_jsonl(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        self.f = open(self.path, "a")
        if tensorboard:
            self.tb = _tensorboard(os.path.join(run_dir, "tb"), purge_step=None if resume_step is None
                                   else resume_step + 1)

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
