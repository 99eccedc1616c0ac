"""patches/megatron-lm-core_v0.19.patch applies to megatron-core 0.19's training code and makes
Megatron's own parser and GPT config produce the MXFP4 model config."""
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATCH = os.path.join(REPO, "patches", "megatron-lm-core_v0.19.patch")
FILES = ("megatron/training/arguments.py", "megatron/training/argument_utils.py")


def _site_megatron():
    import megatron.core
    from megatron.core import package_info

    assert package_info.__version__.startswith("0.19."), package_info.__version__
    return os.path.dirname(os.path.dirname(os.path.abspath(megatron.core.__file__)))


def _git_apply(root, *extra):
    return subprocess.run(["git", "apply", *extra, PATCH], cwd=root, capture_output=True, text=True)


def test_patch_applies_to_the_pinned_training_code(tmp_path):
    src = _site_megatron()
    for f in FILES:
        os.makedirs(tmp_path / os.path.dirname(f), exist_ok=True)
        shutil.copy(os.path.join(os.path.dirname(src), f), tmp_path / f)
    r = _git_apply(tmp_path, "--check", "-v")
    assert r.returncode == 0, r.stderr
    r = _git_apply(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "add_mxfp4_args" in (tmp_path / FILES[0]).read_text()
    assert "configure_from_args" in (tmp_path / FILES[1]).read_text()
    # applied twice is refused: the patch is not silently re-applied
    assert _git_apply(tmp_path, "--check").returncode != 0


SCRIPT = r"""
import sys, typing
if not hasattr(typing, "override"):
    import typing_extensions; typing.override = typing_extensions.override
import megatron.training.arguments as margs
assert margs.__file__.startswith(sys.argv[1]), margs.__file__
sys.argv = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2", "--train-iters", "1",
            "--lr", "1e-4", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--transformer-impl", "local", "--no-gradient-accumulation-fusion"] + sys.argv[2:]
from megatron.training.arguments import parse_and_validate_args
from megatron.training.argument_utils import gpt_config_from_args
import copy
args = parse_and_validate_args()
for flag in (True, False):
    a = copy.copy(args)
    a.mxfp4_backward = flag and args.mxfp4_backward
    cfg = gpt_config_from_args(a)
    spec = cfg.transformer_layer_spec
    print("RESULT", type(spec).__name__, getattr(getattr(spec, "recipe", None), "rht_block", None),
          len(cfg.pre_wrap_hooks))
"""


def test_patched_checkout_parses_the_flags(tmp_path):
    flags = ("--mxfp4-backward", "--mxfp4-rht-block", "32")
    src = _site_megatron()
    dst = tmp_path / "megatron"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    assert _git_apply(tmp_path).returncode == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(dst), *flags], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines == ["RESULT MXFP4LayerSpecProvider 32 1", "RESULT NoneType None 0"], r.stdout[-2000:]
