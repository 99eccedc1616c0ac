"""configs/: every model x arm renders a command whose arguments Megatron's own parser (with the
--mxfp4-* flags) accepts, with the paper's hyperparameters and one variable switching the arm."""
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
ARMS = ("bf16", "te_fp8", "mxfp4", "mxfp4_fp8")
PAPER = {"345m": (24, 1024, 16, 1024, 64, 8, 1.5e-4, 1e-5, 0.01, 1),
         "1.3b": (24, 2048, 16, 2048, 1024, 4, 2e-4, 2e-5, 0.1, 1),
         "6.7b": (32, 4096, 32, 2048, 256, 4, 1.2e-4, 1.2e-5, 0.1, 8)}


def render(script, env=None, extra=()):
    e = dict(os.environ, DRY_RUN="1", TRANSFORMER_IMPL="local", **(env or {}))
    out = subprocess.run(["bash", os.path.join(CONFIGS, script), *extra], env=e, capture_output=True, text=True,
                         check=True).stdout
    return shlex.split(out)


@pytest.mark.parametrize("script", ["pretrain_gpt.sh", "gpt_345m.sh", "gpt_1.3b.sh", "gpt_6.7b.sh", "slurm_gpt.sbatch"])
def test_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", os.path.join(CONFIGS, script)], check=True)


def _megatron_args(cmd):
    pytest.importorskip("megatron.core")
    import megatron_mxfp4.megatron  # noqa: F401  (typing.override on Python 3.11)
    from megatron.training.arguments import parse_args

    from megatron_mxfp4.megatron import add_mxfp4_args

    i = cmd.index("megatron_mxfp4.pretrain_gpt")
    assert cmd[i - 1] == "-m" and cmd[:3] == [cmd[0], "-m", "torch.distributed.run"]
    old = sys.argv
    sys.argv = ["pretrain_gpt"] + cmd[i + 1:]
    try:
        return parse_args(extra_args_provider=add_mxfp4_args)
    finally:
        sys.argv = old


@pytest.mark.parametrize("model", sorted(PAPER))
def test_every_arm_parses_with_the_paper_hyperparameters(model):
    layers, hidden, heads, seq, gbs, mbs, lr, min_lr, wd, tp = PAPER[model]
    rendered = {arm: render(f"gpt_{model}.sh", {"ARM": arm}) for arm in ARMS}
    for arm, cmd in rendered.items():
        a = _megatron_args(cmd)
        assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.seq_length, a.global_batch_size,
                a.micro_batch_size, a.lr, a.min_lr, a.weight_decay, a.tensor_model_parallel_size) == PAPER[model]
        assert a.lr_decay_style == "cosine" and a.lr_warmup_fraction == 0.01 and a.clip_grad == 1.0 and a.bf16
        assert a.hidden_dropout == 0.1 and a.attention_dropout == 0.1
        assert a.mxfp4_backward == arm.startswith("mxfp4")
        if arm != "te_fp8":  # TRANSFORMER_IMPL=local: no apex kernels
            assert a.transformer_impl == "local" and a.no_persist_layer_norm and not a.masked_softmax_fusion
        if arm == "te_fp8":
            assert a.fp8 == "e4m3" and a.transformer_impl == "transformer_engine"
        else:
            assert a.fp8 is None
        if arm.startswith("mxfp4"):
            assert a.mxfp4_forward == ("fp8" if arm == "mxfp4_fp8" else "bf16")
    # one variable switches the arm: the commands differ only in the arm's flags
    base = set(rendered["bf16"])
    assert set(rendered["mxfp4"]) - base == {"--mxfp4-backward", "--mxfp4-forward", "bf16"} - base
    assert base - set(rendered["mxfp4"]) == set()


def test_multinode_and_overrides():
    cmd = render("gpt_6.7b.sh", {"ARM": "mxfp4", "NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "node0",
                                 "SP": "1", "MXFP4_ARGS": "--mxfp4-rht-block 128"}, extra=("--seed", "9"))
    s = " ".join(cmd)
    assert "--nnodes 4 --node_rank 2 --master_addr node0" in s
    assert "--sequence-parallel" in cmd and cmd[-2:] == ["--seed", "9"]
    assert "--mxfp4-rht-block 128" in s


def test_unknown_arm_is_an_error():
    r = subprocess.run(["bash", os.path.join(CONFIGS, "pretrain_gpt.sh")], env=dict(os.environ, DRY_RUN="1", ARM="fp4"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown ARM=fp4" in r.stderr
