"""--mxfp4-* flags -> MXFP4Recipe (in process), and argv -> config -> model through the entry point
(worker)."""
import argparse

import pytest

from megatron_mxfp4 import MXFP4Recipe
from megatron_mxfp4.megatron.args import add_mxfp4_args, recipe_from_args


def parse(*argv):
    return add_mxfp4_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_no_flag_is_stock():
    assert recipe_from_args(parse()) is None


def test_defaults_are_the_recipe_defaults():
    assert recipe_from_args(parse("--mxfp4-backward")) == MXFP4Recipe()


def test_every_flag_maps_to_the_recipe():
    r = recipe_from_args(parse("--mxfp4-backward", "--mxfp4-rht-block", "128", "--mxfp4-sign-policy", "per_layer",
                               "--mxfp4-rounding", "rtn", "--mxfp4-forward", "fp8", "--mxfp4-gemms", "wgrad",
                               "--mxfp4-seed", "0x10", "--mxfp4-backend", "reference",
                               "--mxfp4-bf16-first-layers", "2", "--mxfp4-bf16-last-layers", "1", "--mxfp4-lm-head",
                               "--mxfp4-backward-format", "fp8", "--mxfp4-moe", "none", "--mxfp4-cuda-graphs"))
    assert r == MXFP4Recipe(dgrad=False, wgrad=True, rounding="rtn", rht_block=128, sign_policy="per_layer",
                            forward="fp8", backend="reference", seed=16, bf16_first_layers=2, bf16_last_layers=1,
                            lm_head=True, backward_format="fp8", moe="none", cuda_graphs=True)
    assert recipe_from_args(parse("--mxfp4-backward", "--mxfp4-gemms", "dgrad")).wgrad is False


@pytest.mark.parametrize("argv", [("--mxfp4-rht-block", "48"), ("--mxfp4-rht-block", "x"), ("--mxfp4-gemms", "all"),
                                  ("--mxfp4-forward", "fp16"), ("--mxfp4-bf16-last-layers", "-1"),
                                  ("--mxfp4-seed", "-3"), ("--mxfp4-backward-format", "int8"),
                                  ("--mxfp4-moe", "router")])
def test_bad_values_are_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parse("--mxfp4-backward", *argv)
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("cuda_graph_impl", "local"), ("cuda_graph_impl", "transformer_engine"),
                                         ("enable_cuda_graph", True), ("external_cuda_graph", True)])
def test_megatron_cuda_graph_options_keep_the_counters_on_the_gpu(flag, value):
    args = parse("--mxfp4-backward")
    assert recipe_from_args(args).cuda_graphs is False
    setattr(args, flag, value)
    assert recipe_from_args(args).cuda_graphs is True
    args = parse("--mxfp4-backward")
    args.cuda_graph_impl = "none"
    assert recipe_from_args(args).cuda_graphs is False


def test_te_fp8_and_mxfp4_together_is_an_error():
    args = parse("--mxfp4-backward")
    args.fp8 = "e4m3"
    with pytest.raises(ValueError, match="--fp8-format e4m3"):
        recipe_from_args(args)


def test_argv_to_config_to_model(mcore_results):
    """Megatron's own parser with the plugin's flags (TP=2, local spec, mock data): the recipe, the
    callable spec, the LM-head hook, a model with the MXFP4 classes everywhere (last layer kept in
    BF16, FP8 forward in the quantized layers) that runs forward and backward."""
    from dist_helpers import scenario

    r = scenario(mcore_results, "argv_flow")
    rec = r["recipe"]
    assert (rec["rht_block"], rec["sign_policy"], rec["forward"], rec["seed"], rec["bf16_last_layers"], rec["lm_head"]) \
        == (32, "per_layer", "fp8", 77, 1, True)
    assert r["spec"] == "MXFP4LayerSpecProvider" and r["hooks"] == 1
    assert r["classes"] == ["linear_fc1:MXFP4ColumnParallelLinear", "linear_fc2:MXFP4RowParallelLinear",
                            "linear_proj:MXFP4RowParallelLinear", "linear_qkv:MXFP4ColumnParallelLinear",
                            "output_layer:MXFP4ColumnParallelLinear"]
    assert r["quantized_layers"] == [True, True, False]
    assert r["forward"] == ["bf16", "fp8"]
    assert r["loss_finite"] and r["grads_finite"]
    # the entry point's mock-data path, get_batch (TP broadcast) and loss protocol
    assert r["step_tokens"] == 2 * 32 and 0 < r["step_loss"] < 20 and r["report_keys"] == ["lm loss"]
