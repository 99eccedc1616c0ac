"""Let megatron-core 0.19 run on a CPU: its `torch.cuda.current_device()` / `current_stream()` calls
resolve to the CPU device and a no-op stream. Torch only (safe to call before megatron is imported)."""
import torch


class _NoStream:
    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return None

    def synchronize(self):
        pass


def install_cpu_shims(force: bool = False) -> None:
    """Install the shims; without `force`, only where no CUDA device is visible."""
    if torch.cuda.is_available() and not force:
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
