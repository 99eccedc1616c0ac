"""The committed byte-level BPE tokenizer (and any ``tokenizers`` JSON file) with the interface that
megatron-core's GPTDataset needs (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``).

The committed file ``tokenizer/bpe-8k.json`` has 8,192 tokens: 256 byte tokens, the merges learned
from the two built-in corpora, and two special tokens, ``<|endoftext|>`` (end of document, "eod")
and ``<|pad|>``. ``python -m megatron_mxfp4.data.build_tokenizer`` re-creates it.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import List, Sequence

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer", "bpe-8k.json")
EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("the tokenizer needs the 'tokenizers' package: pip install 'megatron-mxfp4[train]' "
                          "(or pip install tokenizers)") from None
    return tokenizers


class BPETokenizer:
    """A ``tokenizers`` JSON tokenizer with megatron-core's dataset interface."""

    def __init__(self, path: str = DEFAULT_TOKENIZER):
        tokenizers = _import_tokenizers()
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        self.path = os.path.abspath(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"tokenizer file {path!r} is not a tokenizers JSON file ({e})") from None
        with open(self.path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()[:16]
        eod = self._tok.token_to_id(EOD_TOKEN)
        pad = self._tok.token_to_id(PAD_TOKEN)
        if eod is None:
            raise ValueError(f"tokenizer {path!r} has no {EOD_TOKEN} token (needed as end-of-document)")
        self.eod = int(eod)
        self.pad = int(pad) if pad is not None else -1
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("file", os.path.basename(self.path)), ("sha256", self.sha256)])

    # megatron-core reads these two for its pad-collision check
    @property
    def special_tokens_dict(self):
        return {"eos_token": self.eod, "pad_token": self.pad}

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BPETokenizer({os.path.basename(self.path)}, vocab={self.vocab_size}, sha256={self.sha256})"


def load_tokenizer(path: str = "") -> BPETokenizer:
    """The committed tokenizer (default) or a ``tokenizers`` JSON file."""
    return BPETokenizer(path or DEFAULT_TOKENIZER)
