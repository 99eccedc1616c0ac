"""Train the committed byte-level BPE tokenizer (``tokenizer/bpe-8k.json``).

    pip install 'megatron-mxfp4[train,wiki]'
    python -m megatron_mxfp4.data.build_tokenizer [--vocab-size 8192] [--output FILE]

Training text: the Wikipedia lead extracts (``wiki`` corpus) and the Python standard library's
documentation topics and source (``stdlib`` corpus, capped at 8 MB so that code does not dominate).
Byte-level pre-tokenization (GPT-2 style, no prefix space), all 256 bytes in the initial alphabet,
so every input is encodable; special tokens ``<|endoftext|>`` and ``<|pad|>``.
The merges depend on the Python version whose standard library was read; the committed file's
provenance is recorded in its sidecar ``.meta.json``.
"""
from __future__ import annotations

import argparse
import json
import platform

from .corpus import fingerprint, stdlib_documents, wiki_documents
from .tokenizer import DEFAULT_TOKENIZER, EOD_TOKEN, PAD_TOKEN, _import_tokenizers


def train(docs, vocab_size: int):
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def main(argv=None):
    ap = argparse.ArgumentParser(description="train the committed byte-level BPE tokenizer")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--stdlib-bytes", type=int, default=8_000_000, help="cap on standard-library text")
    ap.add_argument("--output", default=DEFAULT_TOKENIZER)
    args = ap.parse_args(argv)
    if args.vocab_size < 512:
        ap.error(f"--vocab-size must be at least 512, got {args.vocab_size}")
    wiki = wiki_documents()
    std = stdlib_documents(max_bytes=args.stdlib_bytes)
    tok = train(wiki + std, args.vocab_size)
    tok.save(args.output)
    meta = {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "wiki_documents": len(wiki), "wiki_fingerprint": fingerprint(wiki),
        "stdlib_documents": len(std), "stdlib_fingerprint": fingerprint(std),
        "python": platform.python_version(), "tokenizers": _import_tokenizers().__version__,
        "command": "python -m megatron_mxfp4.data.build_tokenizer " + " ".join(argv or []),
    }
    with open(args.output.rsplit(".json", 1)[0] + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {args.output}: {meta['vocab_size']} tokens from {len(wiki)} wiki + {len(std)} stdlib documents")


if __name__ == "__main__":
    main()
