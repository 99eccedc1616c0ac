import json

import pytest
import torch


@pytest.fixture(scope="module")
def megatron_cpu():
    """megatron-core on the CPU in this process (what `mxfp4-train --device cpu` sets up), torn
    down afterwards: parallel state, process group and the torch.cuda shims."""
    saved = {k: getattr(torch.cuda, k) for k in ("current_device", "current_stream")}
    from megatron_mxfp4.train.model import import_megatron

    import_megatron()
    yield
    import megatron.core.parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        setattr(torch.cuda, k, v)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small indexed dataset (standard-library text) made by mxfp4-preprocess."""
    from megatron_mxfp4.data import corpus, preprocess

    d = tmp_path_factory.mktemp("data")
    docs = corpus.stdlib_documents(max_bytes=400_000)
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prefix = str(d / "std")
    preprocess.main(["--input", str(src), "--output-prefix", prefix, "--shuffle-seed", "0"])
    return prefix
