"""``mxfp4-train``: A/B training of a megatron-core GPT with the backward GEMMs of its decoder
linears in BF16, FP8 or MXFP4 variants, on real text, with a loss plot and a summary table.

    mxfp4-train --preset tiny --arms bf16,mxfp4,mxfp4-rht-sr             # CPU, a few minutes
    mxfp4-train --preset small --arms bf16,mxfp4,mxfp4-rht-sr --seeds 1,2  # GPU, Wikipedia
    torchrun --nproc-per-node 2 -m megatron_mxfp4.train --preset small --tp 2 --arms bf16,mxfp4-rht-sr
    mxfp4-train --list-arms

Every (arm, seed) trains in ``OUT/<arm>-s<seed>/`` from the same initial weights on the same
batches in the same order; re-running the same command resumes unfinished arms from their last
checkpoint and skips finished ones. ``OUT/summary.md`` and ``OUT/loss.png`` cover every arm in
``OUT``.

Every arm's configuration and model, the data and the run folder are checked before the first arm
trains. Exit status: 0 done; 2 a problem with the command, its data or its run folder (one line on
stderr); 3 --time-limit reached; 130 interrupted (Ctrl-C; the same command resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from ..ops.dispatch import BACKENDS
from . import checkpoint as ckpt
from ._warnings import quiet_third_party
from .arms import ARMS, arms_table, parse_arms, parse_seeds
from .errors import UsageError, user_errors
from .presets import FIELDS, PRESETS

# Config fields that define a run: resuming or adding arms with other values is refused.
_IDENTITY = ("layers", "hidden", "heads", "ffn", "seq_length", "dropout", "init_std", "steps", "global_batch",
             "lr", "min_lr", "warmup", "weight_decay", "clip_grad", "beta2", "corpus", "split", "eval_interval",
             "eval_samples")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main(), not the usage text and exit
        raise UsageError(message)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        v = int(text)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    parse.__name__ = "int"  # argparse names the type in "invalid int value"
    return parse


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mxfp4-train", description=__doc__.split("\n\n")[0],
                                 epilog="arms: " + ", ".join(ARMS), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--arms", default="bf16,mxfp4,mxfp4-rht-sr", help="comma list of arm names (--list-arms)")
    ap.add_argument("--seeds", default="1", help="comma list of seeds (init, data order, dropout, SR/RHT streams)")
    ap.add_argument("--out", default="", help="run folder (default: runs/<preset>)")
    ap.add_argument("--list-arms", action="store_true", help="print the arms table and exit")
    ap.add_argument("--report-only", action="store_true", help="only (re)write summary.md and loss.png of --out")
    d = ap.add_argument_group("data")
    d.add_argument("--corpus", choices=("stdlib", "wiki"), default=None, help="built-in corpus (preset default)")
    d.add_argument("--data-path", default="", help="indexed dataset PREFIX made by mxfp4-preprocess (instead of "
                                                   "a built-in corpus)")
    d.add_argument("--tokenizer", default="", help="tokenizers JSON file (default: the committed bpe-8k)")
    d.add_argument("--split", default=None, help="train,valid,test document weights (preset default)")
    h = ap.add_argument_group("model and optimization (override the preset)")
    for name, typ in (("layers", int), ("hidden", int), ("heads", int), ("ffn", int), ("seq-length", int),
                      ("dropout", float), ("init-std", float), ("steps", int), ("global-batch", int),
                      ("micro-batch", int), ("lr", float), ("min-lr", float), ("warmup", int),
                      ("weight-decay", float), ("clip-grad", float), ("beta2", float), ("eval-interval", int),
                      ("eval-samples", int), ("save-interval", int), ("log-interval", int)):
        h.add_argument("--" + name, type=typ, default=None)
    s = ap.add_argument_group("system")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="model dtype (auto: bf16 on GPU, fp32 on CPU)")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun)")
    s.add_argument("--transformer-impl", choices=("local", "local_sdpa", "transformer_engine"), default="local",
                   help="megatron-core layer spec of every arm (te-fp8 always uses TE); local_sdpa: the local spec "
                        "with PyTorch's fused scaled-dot-product attention")
    s.add_argument("--mxfp4-backend", choices=BACKENDS, default="auto", help="kernel backend of the MXFP4 arms")
    s.add_argument("--shard", default="0/1", help="i/n: run only every n-th (arm, seed) job starting at i "
                                                  "(e.g. one process per GPU)")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    s.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the step that passes this wall time (a checkpoint is saved; exit code 3); "
                        "the same command continues")
    s.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    g = ap.add_argument_group("MXFP4 diagnostics (MXFP4 arms; see mxfp4-report)")
    g.add_argument("--diagnostics-interval", type=_int_at_least(0), default=100, metavar="N",
                   help="every N steps, measure each MXFP4 GEMM against its exact product on one micro batch "
                        "(0 = off)")
    g.add_argument("--guard-snr", type=float, default=None, metavar="X",
                   help="switch a layer's GEMM to the unquantized backward when its SNR stays below X")
    g.add_argument("--guard-patience", type=_int_at_least(1), default=3, metavar="K",
                   help="... for K consecutive checks")
    g.add_argument("--unquantized-tail", type=_fraction, default=0.0, metavar="F",
                   help="run the last fraction F of the steps with an unquantized backward")
    s.add_argument("--exit-after-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: a hard stop
    return ap


def resolve_config(args):
    """The preset with the command line's overrides, checked (ValueError naming the option)."""
    from ..data.indexed import split_weights

    from ..data.indexed import dataset_summary

    cfg = PRESETS[args.preset]
    kw = {f: getattr(args, f) for f in FIELDS if hasattr(args, f)}
    if kw.get("split") is None and getattr(args, "data_path", None):  # a dataset split by package says how
        meta = dataset_summary(args.data_path)
        if meta and meta.get("split"):
            kw["split"] = meta["split"]
    cfg = cfg.override(**kw)
    for f in ("layers", "hidden", "heads", "ffn", "seq_length", "steps", "global_batch", "micro_batch",
              "eval_interval", "eval_samples", "save_interval", "log_interval"):
        if getattr(cfg, f) <= 0:
            raise ValueError(f"--{f.replace('_', '-')} must be positive, got {getattr(cfg, f)}")
    for f in ("lr", "init_std"):
        if getattr(cfg, f) <= 0:
            raise ValueError(f"--{f.replace('_', '-')} must be positive, got {getattr(cfg, f)}")
    for f in ("min_lr", "warmup", "weight_decay", "clip_grad"):
        if getattr(cfg, f) < 0:
            raise ValueError(f"--{f.replace('_', '-')} must be >= 0, got {getattr(cfg, f)}")
    if not 0 <= cfg.beta2 < 1:
        raise ValueError(f"--beta2 must be in [0, 1), got {cfg.beta2}")
    split_weights(cfg.split)
    if cfg.hidden % cfg.heads:
        raise ValueError(f"--hidden {cfg.hidden} is not a multiple of --heads {cfg.heads}")
    if cfg.global_batch % cfg.micro_batch:
        raise ValueError(f"--global-batch {cfg.global_batch} is not a multiple of --micro-batch {cfg.micro_batch}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    return cfg


def _parse_shard(text: str):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _check_run_folder(out: str, meta: dict) -> None:
    """Refuse a run folder whose config.json has other settings than `meta`."""
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get("config", {}).get(k), meta["config"][k]) for k in _IDENTITY
                if old.get("config", {}).get(k) != meta["config"][k]}
        if old.get("data", {}).get("corpus_fingerprint") != meta["data"].get("corpus_fingerprint"):
            diff["data"] = (old.get("data", {}).get("corpus_fingerprint"), meta["data"].get("corpus_fingerprint"))
        if old.get("tp", 1) != meta["tp"]:
            diff["tp"] = (old.get("tp", 1), meta["tp"])
        if diff:
            raise UsageError(f"{out} holds a run with other settings "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, a, b in ((k, *v) for k, v in diff.items()))}); "
                             "use another --out")


def _write_config(out: str, meta: dict) -> None:
    """Write OUT/config.json unless it exists; called once every check has passed, so that a refused
    command leaves no settings behind to refuse the corrected one."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # processes of other shards may write it at the same time
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, path)


def main(argv=None) -> int:
    """The console script; returns the exit status (see the module docstring)."""
    quiet_third_party()
    try:
        return _main(argv)
    except UsageError as e:
        print(f"mxfp4-train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal
            print(f"mxfp4-train: interrupted; {_resume_hint(getattr(e, 'run_dir', None))}", file=sys.stderr)
        return 130


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C while `run_dir` was training."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        self.run_dir = run_dir


def _resume_hint(run_dir) -> str:
    step = ckpt.latest_step(run_dir) if run_dir else None
    if step is None:
        return "run the same command to start " + (f"{run_dir} again" if run_dir else "again")
    return f"last checkpoint {ckpt.ckpt_dir(run_dir, step)} (step {step}); run the same command to resume from it"


def _main(argv) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list_arms:
        print(arms_table())
        return 0
    out = args.out or os.path.join("runs", args.preset)
    if args.report_only:
        from .report import write_summary

        if not os.path.isdir(out):
            raise UsageError(f"--out {out} is not a run folder")
        print(write_summary(out))
        print(f"\nwrote {os.path.join(out, 'summary.md')}")
        return 0
    with user_errors():
        arms = parse_arms(args.arms)
        seeds = parse_seeds(args.seeds)
        cfg = resolve_config(args)
        shard = _parse_shard(args.shard)
        if args.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {args.tp}")
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
    _check_out(out)
    return run(args, cfg, arms, seeds, shard, out, argv)


def _check_out(out: str) -> None:
    """--out must be a folder this process can write in, or a path where one can be made."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {probe} is not writable")


def run(args, cfg, arms, seeds, shard, out, argv) -> int:
    """Check every arm, the data and the run folder (UsageError), then train the shard's jobs."""
    import torch

    from .model import check_model, check_te, import_megatron, init_distributed

    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = [(a, s) for s in seeds for a in arms]
    jobs = [j for k, j in enumerate(jobs) if k % shard[1] == shard[0]]
    for arm, seed in jobs:  # every arm's recipe
        check_te(arm, args.transformer_impl)
        with user_errors(f"arm {arm.name!r} seed {seed}: "):
            arm.with_seed(seed, args.mxfp4_backend)
    vocab_size = _check_data(args, cfg)
    import_megatron()
    dist = init_distributed(args.device, args.tp, seed=seeds[0])
    if args.dtype == "auto":
        dtype = torch.bfloat16 if dist.device.type == "cuda" else torch.float32
    else:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for arm in {a.name: a for a, _ in jobs}.values():
        with user_errors(f"arm {arm.name!r}: "):
            check_model(cfg, arm.with_seed(seeds[0], args.mxfp4_backend), dist, dtype, vocab_size)
    is_main = dist.rank == 0
    log = print if is_main else (lambda *a, **k: None)
    data_prefix, data_meta, split = _prepare_data(args, cfg, out, dist)
    cfg = cfg.override(split=split)  # a corpus split by package (its metadata) says where validation starts
    from ..data.indexed import build_gpt_datasets, tokenizer_info
    from .loop import TimeLimitReached, check_data, train_arm

    tok = tokenizer_info(data_prefix, _tokenizer_if_given(args))
    command = "mxfp4-train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {"preset": args.preset, "command": command, "config": cfg.to_dict(), "tp": dist.tp,
            "params": cfg.params_estimate(tok.vocab_size), "data": data_meta,
            "transformer_impl": args.transformer_impl, "dtype": str(dtype).replace("torch.", "")}
    if is_main:
        _check_run_folder(out, meta)

    def datasets_of(seed):
        with user_errors():
            data = build_gpt_datasets(data_prefix, tok, seq_length=cfg.seq_length, seed=seed,
                                      train_samples=cfg.steps * cfg.global_batch, split=cfg.split,
                                      cache_dir=os.path.join(out, "data", "cache"))
        check_data(cfg, dist, data)
        return data

    datasets = {seeds[0]: datasets_of(seeds[0])} if jobs else {}  # the data checks, before any arm trains
    if is_main:
        _write_config(out, meta)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    log(f"mxfp4-train: preset {args.preset}, {len(jobs)} run(s) ({', '.join(f'{a.name}/s{s}' for a, s in jobs)}); "
        f"{dist.device.type} {str(dtype).replace('torch.', '')}, TP {dist.tp} × DP {dist.dp}; data "
        f"{data_meta.get('source')}: {data_meta.get('tokens', 0):,} tokens; ~{meta['params'] / 1e6:.1f}M parameters")
    deadline = None if args.time_limit is None else t_start + args.time_limit
    rc = 0
    for arm, seed in jobs:
        if seed not in datasets:
            datasets = {seed: datasets_of(seed)}
        run_dir = os.path.join(out, f"{arm.name}-s{seed}")
        try:
            train_arm(arm.with_seed(seed, args.mxfp4_backend), seed, cfg, dist, run_dir, datasets[seed], dtype=dtype,
                      impl=args.transformer_impl, vocab_size=tok.vocab_size,
                      progress=not args.no_progress and sys.stderr.isatty(), exit_after_step=args.exit_after_step,
                      deadline=deadline, log=log, diagnostics_cfg=dict(
                          interval=args.diagnostics_interval, snr_threshold=args.guard_snr,
                          patience=args.guard_patience, unquantized_tail=args.unquantized_tail))
        except TimeLimitReached as e:
            log(f"\n{e}; run the same command again to continue")
            rc = 3
            break
        except KeyboardInterrupt:
            raise _Interrupted(run_dir) from None
    if is_main:
        from .report import write_summary

        tab = write_summary(out)
        log("\n" + tab)
        log(f"\nwrote {os.path.join(out, 'summary.md')} and loss.png ({time.time() - t_start:.0f} s)")
    return rc


def _check_data(args, cfg) -> int:
    """The vocabulary size of the run's data, after the checks that need no tokenizing: the dataset's
    files (--data-path), the tokenizer file (--tokenizer), the package of the built-in corpus."""
    from ..data.corpus import wiki_json_path
    from ..data.indexed import check_files, read_meta
    from ..data.tokenizer import load_tokenizer

    with user_errors():
        if args.data_path:
            check_files(args.data_path)
            if not args.tokenizer:
                return int(read_meta(args.data_path)["tokenizer"]["vocab_size"])
        elif cfg.corpus == "wiki":
            try:
                wiki_json_path()
            except RuntimeError as e:  # another version of the pinned package
                raise UsageError(str(e)) from e
        try:
            return load_tokenizer(args.tokenizer).vocab_size
        except ImportError as e:  # the tokenizers package
            raise UsageError(str(e)) from e


def _tokenizer_if_given(args):
    if args.tokenizer:
        from ..data.tokenizer import load_tokenizer

        return load_tokenizer(args.tokenizer)
    return None


def _prepare_data(args, cfg, out, dist):
    """(indexed-dataset prefix, its metadata, the split to use): a user dataset, or the preset's built-in
    corpus tokenized once into OUT/data; the split is the dataset's own (a corpus split by package) unless
    --split was given."""
    import torch

    from ..data.indexed import dataset_summary, prepare_builtin, read_meta, split_weights

    if args.data_path:
        prefix = args.data_path
        meta = dataset_summary(prefix) or {"source": prefix}
    else:
        prefix = None
        if dist.rank == 0:
            prefix = prepare_builtin(cfg.corpus, os.path.join(out, "data"), args.tokenizer)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            box = [prefix]
            torch.distributed.broadcast_object_list(box, src=0)
            prefix = box[0]
        meta = read_meta(prefix)
    meta = dict(meta)
    meta["prefix"] = prefix  # as given (relative paths stay relative)
    tok = meta.get("tokenizer", {})
    meta["tokenizer"] = f"{tok.get('name', '?')} (vocab {tok.get('vocab_size', '?')}, sha256 {tok.get('sha256', '?')})" \
        if isinstance(tok, dict) else tok
    split = meta["split"] if args.split is None and meta.get("split") else cfg.split
    parts = split_weights(split)
    if meta.get("tokens"):
        meta["train_tokens"] = int(meta["tokens"] * parts[0] / sum(parts))
    return prefix, meta, split
