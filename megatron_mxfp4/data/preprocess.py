"""``mxfp4-preprocess``: tokenize text into megatron-core's indexed dataset (``PREFIX.bin/.idx``).

    mxfp4-preprocess --input corpus.jsonl --output-prefix data/mycorpus          # JSON lines, "text" field
    mxfp4-preprocess --input book.txt --text-mode file --output-prefix data/book  # a text file = 1 document
    mxfp4-preprocess --corpus wiki --output-prefix data/wiki                      # a built-in corpus
    mxfp4-preprocess --corpus site-packages --output-prefix data/site             # this environment's sources
    mxfp4-train --preset small --data-path data/mycorpus --arms bf16,mxfp4-rht-sr

Inputs: ``.jsonl``/``.json`` files are JSON lines (``--json-key``, default ``text``); other files
are plain text, one document per blank-line-separated block (``--text-mode paragraphs``) or per
file (``--text-mode file``). Several ``--input`` are concatenated in order. Documents are kept in
input order unless ``--shuffle-seed`` is given (the validation split is the last documents). The
``site-packages`` corpus is split by package: its metadata records the ``split`` that selects exactly its
validation packages (mxfp4-train's default for the dataset) and a manifest of what was read; a shuffle then
stays on each side of the split.
"""
from __future__ import annotations

import argparse
import random
import time

from .corpus import CORPORA, load_corpus, read_documents, site_packages_corpus
from .indexed import write_indexed_dataset
from .tokenizer import load_tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mxfp4-preprocess", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", help="text or JSON-lines file (repeatable)")
    src.add_argument("--corpus", choices=CORPORA, help="a built-in corpus instead of files")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    ap.add_argument("--tokenizer", default="", help="a tokenizers JSON file (default: the committed bpe-8k)")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--text-mode", choices=("paragraphs", "file"), default="paragraphs")
    ap.add_argument("--shuffle-seed", type=int, default=None, help="shuffle documents with this seed")
    args = ap.parse_args(argv)
    t0 = time.time()
    tok = load_tokenizer(args.tokenizer)
    extra = None
    if args.corpus == "site-packages":
        corpus = site_packages_corpus()
        if args.shuffle_seed is not None:
            corpus = corpus.shuffled(args.shuffle_seed)
        docs, source = corpus.docs, "built-in corpus 'site-packages' (this environment's source files)"
        extra = {"split": corpus.split, "manifest": corpus.manifest}
    elif args.corpus:
        docs, source = load_corpus(args.corpus), f"built-in corpus {args.corpus!r}"
    else:
        docs = []
        for path in args.input:
            docs.extend(read_documents(path, args.json_key, args.text_mode))
        source = ", ".join(args.input)
    if args.shuffle_seed is not None and extra is None:
        random.Random(args.shuffle_seed).shuffle(docs)
    meta = write_indexed_dataset(docs, tok, args.output_prefix, source=source, extra=extra)
    print(f"{args.output_prefix}.bin/.idx: {meta['documents']:,} documents, {meta['tokens']:,} tokens "
          f"({tok}), {time.time() - t0:.1f} s" + (f"; split {meta['split']} (by package)" if extra else ""))
    return meta


def cli(argv=None) -> int:
    """The console script: `main`, exit status 0 (its metadata is in PREFIX.meta.json)."""
    main(argv)
    return 0


if __name__ == "__main__":
    cli()
