"""Tokenized corpora in megatron-core's indexed-dataset format (``PREFIX.bin`` / ``PREFIX.idx``) and
the train/validation `GPTDataset`s built on them.

Every document is tokenized and followed by the end-of-document token. Beside the two files a
sidecar ``PREFIX.meta.json`` records the tokenizer (vocabulary size, eod and pad ids, file hash)
and the corpus fingerprint, so training needs neither the text nor the ``tokenizers`` package.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

from .corpus import fingerprint


class TokenizerInfo:
    """What GPTDataset reads from a tokenizer, restored from a dataset's sidecar."""

    def __init__(self, vocab_size: int, eod: int, pad: int, name: str, sha256: str):
        self.vocab_size, self.eod, self.pad = int(vocab_size), int(eod), int(pad)
        self.name, self.sha256 = name, sha256
        self.unique_identifiers = OrderedDict([("class", "BPETokenizer"), ("file", name), ("sha256", sha256)])

    @property
    def special_tokens_dict(self):
        return {"eos_token": self.eod, "pad_token": self.pad}


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock on `path` (created): processes sharing a run folder build data once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def write_indexed_dataset(docs: Sequence[str], tokenizer, prefix: str, *, source: str = "",
                          batch_docs: int = 256, extra: Optional[dict] = None) -> dict:
    """Tokenize `docs` (each followed by eod) into ``prefix.bin/.idx`` + ``prefix.meta.json``.
    `extra`: more metadata (e.g. a corpus's ``split`` and ``manifest``). Returns the metadata."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if not docs:
        raise ValueError(f"no documents to write to {prefix} (empty input?)")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_bin, tmp_idx = prefix + ".bin.tmp", prefix + ".idx.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    n_tokens = 0
    for i in range(0, len(docs), batch_docs):
        for ids in tokenizer.tokenize_batch(docs[i:i + batch_docs]):
            ids.append(tokenizer.eod)
            n_tokens += len(ids)
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
    builder.finalize(tmp_idx)
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, prefix + ".idx")
    meta = {
        "documents": len(docs), "tokens": n_tokens, "corpus_fingerprint": fingerprint(docs), "source": source,
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod, "pad": tokenizer.pad,
                      "name": os.path.basename(getattr(tokenizer, "path", "tokenizer")),
                      "sha256": getattr(tokenizer, "sha256", "")},
        **(extra or {}),
    }
    with open(meta_path(prefix), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return meta


def check_files(prefix: str) -> None:
    """Raise FileNotFoundError naming the missing file when PREFIX.bin or PREFIX.idx does not exist."""
    for ext in (".bin", ".idx"):
        if not os.path.exists(prefix + ext):
            raise FileNotFoundError(f"indexed dataset {prefix!r}: {prefix + ext} does not exist (make it with "
                                    "mxfp4-preprocess --input FILE --output-prefix PREFIX)")


def read_meta(prefix: str) -> dict:
    check_files(prefix)
    if not os.path.exists(meta_path(prefix)):
        raise FileNotFoundError(f"indexed dataset {prefix!r} has no {meta_path(prefix)}; it was not made by "
                                "mxfp4-preprocess: pass --tokenizer FILE to name the tokenizer that made it")
    with open(meta_path(prefix)) as f:
        return json.load(f)


def tokenizer_info(prefix: str, tokenizer=None) -> TokenizerInfo:
    """The dataset's tokenizer description (from its sidecar, or from `tokenizer`)."""
    if tokenizer is not None:
        return TokenizerInfo(tokenizer.vocab_size, tokenizer.eod, tokenizer.pad,
                             os.path.basename(getattr(tokenizer, "path", "tokenizer")), getattr(tokenizer, "sha256", ""))
    t = read_meta(prefix)["tokenizer"]
    return TokenizerInfo(t["vocab_size"], t["eod"], t["pad"], t["name"], t["sha256"])


def prepare_builtin(corpus: str, cache_dir: str, tokenizer_path: str = "", shuffle_seed: int = 0) -> str:
    """Tokenize a built-in corpus once into `cache_dir` (locked, reused when present); returns the
    prefix. Documents are shuffled with a fixed seed so that the validation split (the last
    documents) samples the whole corpus; a corpus split by package ("site-packages") is shuffled on each
    side of its split, which its metadata records."""
    from .corpus import load_corpus, site_packages_corpus
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    extra = None
    if corpus == "site-packages":
        split = site_packages_corpus().shuffled(shuffle_seed)
        docs, extra = split.docs, {"split": split.split, "manifest": split.manifest}
    else:
        docs = load_corpus(corpus)
        order = list(range(len(docs)))
        random.Random(shuffle_seed).shuffle(order)
        docs = [docs[i] for i in order]
    prefix = os.path.join(cache_dir, f"{corpus}-{fingerprint(docs)}-{tok.sha256}")
    with file_lock(os.path.join(cache_dir, ".lock")):
        if not (os.path.exists(prefix + ".idx") and os.path.exists(meta_path(prefix))):
            write_indexed_dataset(docs, tok, prefix, source=f"built-in corpus {corpus!r}", extra=extra)
    return prefix


def split_weights(split: str) -> List[float]:
    """The train, valid, test weights of a ``--split`` text ("97,3,0"); train and valid must be > 0."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or parts[0] <= 0 or parts[1] <= 0 or min(parts) < 0:
        raise ValueError(f"--split must be 'train,valid,test' weights with train and valid > 0, got {split!r}")
    return parts


def build_gpt_datasets(prefix: str, tok_info: TokenizerInfo, *, seq_length: int, seed: int, train_samples: int,
                       split: str, cache_dir: str) -> Tuple[object, object]:
    """(train, validation) megatron-core GPTDatasets over one indexed dataset. The train dataset has
    `train_samples` samples (as many epochs as needed, shuffled by `seed`); validation is one pass
    over its split."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    parts = split_weights(split)
    n_docs = _num_documents(prefix)
    n_valid = int(round(n_docs * parts[1] / sum(parts)))
    if n_valid < 1:
        raise ValueError(f"{prefix} has {n_docs} documents: the validation split {split!r} gets none; "
                         "raise its weight or use a larger corpus")
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split=split,
        path_to_cache=cache_dir, tokenizer=tok_info, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=True, mid_level_dataset_surplus=0.005)
    os.makedirs(cache_dir, exist_ok=True)
    import torch

    multi_rank = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    # several ranks: megatron-core builds on rank 0 first (barrier); several processes: the lock
    with contextlib.nullcontext() if multi_rank else file_lock(os.path.join(cache_dir, ".lock")):
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, None, None], lambda: True, cfg).build()
    if valid is None or len(valid) == 0:
        raise ValueError(f"{prefix}: the validation split is empty (sequence length {seq_length} is longer than "
                         "its text?)")
    return train, valid


def _num_documents(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return len(IndexedDataset(prefix).document_indices) - 1


def collate(samples: List[dict]) -> dict:
    """Stack GPTDataset samples into a batch (tokens, labels, loss_mask, position_ids, attention_mask)."""
    import torch

    out = {}
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        out[k] = torch.stack([s[k] for s in samples])
    mask = samples[0].get("attention_mask")
    if mask is not None:  # identical causal mask for every sample (no reset_attention_mask)
        out["attention_mask"] = mask.unsqueeze(0) if mask.dim() == 3 else mask
    return out


def sample_batch(dataset, start: int, count: int) -> dict:
    """Samples [start, start + count) of a GPTDataset as one batch."""
    return collate([dataset[i] for i in range(start, start + count)])


def dataset_summary(prefix: str) -> Optional[dict]:
    try:
        return read_meta(prefix)
    except FileNotFoundError:
        return None
