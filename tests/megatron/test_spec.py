"""The spec walker and GPT layer spec (in process), and spec coverage in a built GPTModel (worker)."""
import dataclasses
import functools

import pytest

pytest.importorskip("megatron.core")

import megatron_mxfp4.megatron as mm  # noqa: E402
from dist_helpers import scenario  # noqa: E402
from megatron.core.extensions import transformer_engine as te  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_layer import TransformerLayer  # noqa: E402
from megatron_mxfp4 import MXFP4Recipe  # noqa: E402

R = MXFP4Recipe(rht_block=32)


def _linears(spec):
    sub = spec.submodules
    attn = sub.self_attention.submodules
    mlp = sub.mlp.keywords["submodules"] if isinstance(sub.mlp, functools.partial) else sub.mlp.submodules
    return {"linear_qkv": attn.linear_qkv, "linear_proj": attn.linear_proj,
            "linear_fc1": mlp.linear_fc1, "linear_fc2": mlp.linear_fc2}


def test_local_spec_swap():
    base = get_gpt_layer_local_spec()
    spec = mm.get_gpt_layer_spec(R)
    assert spec.module is mm.MXFP4TransformerLayer
    got = _linears(spec)
    for name, cls in (("linear_qkv", mm.MXFP4ColumnParallelLinear), ("linear_proj", mm.MXFP4RowParallelLinear),
                      ("linear_fc1", mm.MXFP4ColumnParallelLinear), ("linear_fc2", mm.MXFP4RowParallelLinear)):
        assert isinstance(got[name], ModuleSpec) and got[name].module is cls and got[name].params == {"recipe": R}
    # norms and everything else untouched; the base spec is not modified
    assert spec.submodules.input_layernorm is base.submodules.input_layernorm
    assert spec.submodules.pre_mlp_layernorm is base.submodules.pre_mlp_layernorm
    assert spec.submodules.self_attention.submodules.core_attention is base.submodules.self_attention.submodules.core_attention
    assert spec.submodules.sharded_state_dict_keys_map == base.submodules.sharded_state_dict_keys_map
    assert _linears(base)["linear_qkv"] is ColumnParallelLinear and base.module is TransformerLayer
    assert isinstance(spec.submodules.mlp, functools.partial)  # the 0.18+ MLP representation survives


def test_te_fused_layernorm_linears_get_their_norm_back():
    """A TE spec (built by hand: calling megatron's TE spec function needs TE installed) with
    fused-LayerNorm QKV/FC1: the swap restores input_layernorm / pre_mlp_layernorm and the
    checkpoint key map; TE attention is kept."""
    base = get_gpt_layer_local_spec()
    sub = base.submodules
    attn = dataclasses.replace(sub.self_attention.submodules, linear_qkv=te.TELayerNormColumnParallelLinear,
                               linear_proj=te.TERowParallelLinear, core_attention=te.TEDotProductAttention)
    mlp_sub = dataclasses.replace(sub.mlp.keywords["submodules"], linear_fc1=te.TELayerNormColumnParallelLinear,
                                  linear_fc2=te.TERowParallelLinear)
    te_spec = dataclasses.replace(base, submodules=dataclasses.replace(
        sub, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, sharded_state_dict_keys_map={},
        self_attention=dataclasses.replace(sub.self_attention, submodules=attn),
        mlp=functools.partial(sub.mlp.func, submodules=mlp_sub)))
    spec = mm.swap_linear_specs(te_spec, R)
    got = _linears(spec)
    assert got["linear_qkv"].module is mm.MXFP4ColumnParallelLinear
    assert got["linear_fc1"].module is mm.MXFP4ColumnParallelLinear
    assert got["linear_proj"].module is mm.MXFP4RowParallelLinear
    assert got["linear_fc2"].module is mm.MXFP4RowParallelLinear
    from megatron.core.extensions.transformer_engine_spec_provider import _TENormWithResidual

    assert spec.submodules.input_layernorm is _TENormWithResidual
    assert spec.submodules.pre_mlp_layernorm is _TENormWithResidual
    assert spec.submodules.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    assert spec.submodules.self_attention.submodules.core_attention is te.TEDotProductAttention
    # only the LN-fused linears bring a norm back: a TE spec with plain TE linears keeps IdentityOp
    plain = dataclasses.replace(te_spec, submodules=dataclasses.replace(
        te_spec.submodules, self_attention=dataclasses.replace(
            te_spec.submodules.self_attention,
            submodules=dataclasses.replace(attn, linear_qkv=te.TEColumnParallelLinear))))
    assert mm.swap_linear_specs(plain, R).submodules.input_layernorm is IdentityOp


def test_walker_rejects_a_spec_without_linears_and_bad_recipes():
    with pytest.raises(ValueError, match="nothing to swap"):
        mm.swap_linear_specs(ModuleSpec(module=IdentityOp), R)
    with pytest.raises(TypeError, match="MXFP4Recipe"):
        mm.swap_linear_specs(get_gpt_layer_local_spec(), {"rht_block": 32})
    with pytest.raises(TypeError, match="base_spec"):
        mm.get_gpt_layer_spec(R, get_gpt_layer_local_spec(), transformer_engine=True)


def test_provider_is_a_callable_spec_for_gpt_model_config():
    import inspect

    provider = mm.MXFP4LayerSpecProvider(R, base=get_gpt_layer_local_spec())
    assert "vp_stage" in inspect.signature(provider).parameters
    spec = provider(None, vp_stage=None)
    assert _linears(spec)["linear_fc2"].module is mm.MXFP4RowParallelLinear
    called = {}

    def base(cfg, vp_stage=None):
        called["vp"] = vp_stage
        return get_gpt_layer_local_spec()

    mm.MXFP4LayerSpecProvider(R, base=base)(None, vp_stage=3)
    assert called == {"vp": 3}


def test_gpt_model_spec_coverage(mcore_results):
    """4-layer GPTModel at TP=2 with bf16_first_layers=1, bf16_last_layers=1, lm_head=True: 4 MXFP4
    linears per layer, both norms present, Philox layer ids 8·layer + slot, first and last layer
    unquantized, the LM head converted with id 1, one call per linear, finite gradients."""
    r = scenario(mcore_results, "spec_coverage")
    assert r["layer_class"] == ["MXFP4TransformerLayer"] * 4
    for i, layer in enumerate(r["layers"], start=1):
        assert layer["number"] == i
        assert layer["linears"] == ["mlp.linear_fc1:MXFP4ColumnParallelLinear", "mlp.linear_fc2:MXFP4RowParallelLinear",
                                    "self_attention.linear_proj:MXFP4RowParallelLinear",
                                    "self_attention.linear_qkv:MXFP4ColumnParallelLinear"]
        assert layer["ids"] == [8 * i + s for s in range(4)]
        assert layer["names"] == [f"decoder.layers.{i - 1}.{n}" for n in (
            "mlp.linear_fc1", "mlp.linear_fc2", "self_attention.linear_proj", "self_attention.linear_qkv")]
        assert layer["quantized"] == [i not in (1, 4)]
        assert "IdentityOp" not in layer["norms"] and len(layer["norms"]) == 2
    assert r["head_before"] == "ColumnParallelLinear" and r["head_after"] == "MXFP4ColumnParallelLinear"
    assert r["head_id"] == 1 and r["n_mxfp4"] == 17 and r["calls"] == [1]
    assert r["all_grads_finite"]


def _moe(spec):
    mlp = spec.submodules.mlp
    return mlp.func, mlp.keywords["submodules"]


def test_moe_spec_swaps_routed_and_shared_experts_not_the_router():
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    base_cls, base = _moe(get_gpt_layer_local_spec(num_experts=4))
    cls, sub = _moe(mm.get_gpt_layer_spec(R, num_experts=4))
    assert cls is base_cls is MoELayer and sub.router is base.router
    assert sub.experts.func is SequentialMLP
    for mlp in (sub.experts.keywords["submodules"], sub.shared_experts.keywords["submodules"]):
        assert mlp.linear_fc1.module is mm.MXFP4ColumnParallelLinear and mlp.linear_fc1.params == {"recipe": R}
        assert mlp.linear_fc2.module is mm.MXFP4RowParallelLinear
    assert base.experts.keywords["submodules"].linear_fc1 is ColumnParallelLinear  # base spec untouched
    # the local spec has no grouped experts: moe_grouped_gemm also gives SequentialMLP, which is covered
    assert _moe(mm.get_gpt_layer_spec(R, num_experts=4, moe_grouped_gemm=True))[1].experts.func is SequentialMLP


def test_moe_none_keeps_the_moe_block_stock():
    r = dataclasses.replace(R, moe="none")
    base = get_gpt_layer_local_spec(num_experts=4)
    spec = mm.swap_linear_specs(base, r)
    assert _moe(spec)[1].experts is _moe(base)[1].experts
    assert _moe(spec)[1].shared_experts is _moe(base)[1].shared_experts
    assert _linears_attn(spec)["linear_qkv"].module is mm.MXFP4ColumnParallelLinear


def test_grouped_experts_are_refused_with_the_fix():
    class GroupedExperts:  # stands in for TE's TEGroupedMLP (needs TE)
        pass

    base = get_gpt_layer_local_spec(num_experts=4)
    cls, sub = _moe(base)
    spec = dataclasses.replace(base, submodules=dataclasses.replace(
        base.submodules, mlp=functools.partial(cls, submodules=dataclasses.replace(
            sub, experts=functools.partial(GroupedExperts, submodules=sub.experts.keywords["submodules"])))))
    with pytest.raises(ValueError, match="GroupedExperts.*SequentialMLP.*--mxfp4-moe none"):
        mm.swap_linear_specs(spec, R)
    assert _moe(mm.swap_linear_specs(spec, dataclasses.replace(R, moe="none")))[1].experts.func is GroupedExperts


def _linears_attn(spec):
    attn = spec.submodules.self_attention.submodules
    return {"linear_qkv": attn.linear_qkv, "linear_proj": attn.linear_proj}


def test_moe_block_spec_of_the_training_path_is_converted():
    """`--num-experts` in megatron.training builds `get_gpt_decoder_block_spec` (MoE and dense layers
    by `moe_layer_freq`); the provider converts both kinds of layer."""
    from dist_helpers import tiny_moe_config
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cfg = tiny_moe_config(layers=2, moe_layer_freq=[1, 0])
    provider = mm.MXFP4LayerSpecProvider(R, base=lambda c: get_gpt_decoder_block_spec(
        c, use_transformer_engine=False, pp_rank=0))
    moe, dense = provider(cfg).layer_specs
    assert moe.module is dense.module is mm.MXFP4TransformerLayer
    assert moe.submodules.mlp.func is MoELayer
    assert _moe(moe)[1].experts.keywords["submodules"].linear_fc2.module is mm.MXFP4RowParallelLinear
    assert _linears(dense)["linear_fc1"].module is mm.MXFP4ColumnParallelLinear
