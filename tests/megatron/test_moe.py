"""Mixture-of-Experts: the MXFP4 backward in megatron-core's MoE layer (moe_worker.py scenarios, 2
processes on gloo)."""
import pytest

pytest.importorskip("megatron.core")

from dist_helpers import scenario  # noqa: E402

PARITY_CASES = ["ep1", "ep2", "etp2"]


@pytest.mark.parametrize("case", PARITY_CASES)
def test_moe_gpt_bit_identical_to_stock_with_quantization_off(moe_results, case):
    """Tiny MoE GPT (2 layers, 4 experts, top-2, a shared expert): loss and every gradient equal
    megatron-core's local spec bit for bit; the routed experts run the plugin's Function (ids: one
    per layer and role, the global expert index beside it), the router stays stock."""
    r = scenario(moe_results, "moe_parity")[case]
    assert r["loss_equal"] and r["grads_equal"] and r["no_grad"] == [], r
    assert r["n_expert_linears"] == (8 if case == "ep2" else 16) and r["expert_calls"] == [1]
    # layer n: attention 8n, 8n+1, shared expert 8n+2, 8n+3, routed experts' FC1 8n+4, FC2 8n+5
    assert r["expert_ids"] == [[8 * n + s, e] for n in (1, 2) for s in (4, 5) for e in range(4)]
    assert r["is_expert"] and r["router_stock"]


@pytest.mark.parametrize("case", PARITY_CASES)
def test_moe_checkpoint_loads_in_plain_megatron(moe_results, case):
    """The MXFP4 MoE model's state_dict has stock keys and loads (strict) into a stock model, which
    computes the same loss."""
    r = scenario(moe_results, "moe_parity")[case]
    assert r["keys_equal"] and r["load_loss_equal"], r


def test_experts_with_0_and_1_tokens(moe_results):
    """Experts receiving 0, 1, 7, 24 tokens: stock results with quantization off; with SR + RHT
    finite gradients of stock shapes, zero dW for the expert without tokens, bounded error."""
    r = scenario(moe_results, "moe_token_counts")
    assert r["identity_equal"] and r["shapes"] and r["finite"] and r["empty_expert_zero"], r
    assert all(0 < e < 0.6 for e in r["rel_err"].values()) and 0 < r["dx_rel_err"] < 0.6, r


def test_expert_gradients_are_unbiased(moe_results):
    """Mean of N draws of SR + RHT expert gradients (token counts 5, 27, 0, 32: zero-padded) against
    the exact ones: unbiased draws shrink the relative error by sqrt(N) (expected ratio 5.7 at N = 32);
    we require > sqrt(N)/2 for every dW and dX. Each error is a norm over >= 4096 elements, so a
    factor-2 miss of an unbiased estimator is many standard deviations away. Negative control: RTN
    without RHT is deterministic, all its error is bias, the mean does not improve (ratio 1)."""
    r = scenario(moe_results, "moe_unbiased")
    n = r["n_draws"]
    for name, e in r["sr"].items():
        assert e["single"] / e["mean"] > n ** 0.5 / 2, (name, e)
    for name, e in r["rtn"].items():
        assert e["single"] / e["mean"] < 1.5 and e["mean"] > 0.05, (name, e)


def test_expert_parallel_2_equals_1_statistically(moe_results):
    """Same weights at EP = 1 and EP = 2 (tokens differ per rank): exact gradients agree to float32
    rounding; with SR + RHT both means over N draws are within 2/sqrt(N) of one draw's error from the
    exact gradient (unbiased: expected 1/sqrt(N)), and within 2·sqrt(2)/sqrt(N) of each other."""
    r = scenario(moe_results, "moe_expert_parallel")
    n = r["n_draws"]
    assert r["exact_max_rel_diff"] < 1e-5, r
    assert len(r["experts"]) == 8, r  # 4 experts x (FC1, FC2), gathered from both EP ranks
    for name, e in r["experts"].items():
        bound = 2 * e["single"] / n ** 0.5
        assert e["mean_ep1"] < bound and e["mean_ep2"] < bound, (name, e)
        assert e["ep2_vs_ep1"] < 2 ** 0.5 * bound, (name, e)


def test_expert_seeds_follow_the_expert_replica(moe_results):
    """An expert's Philox key differs between its data-parallel replicas (EP 1 on 2 ranks: other
    tokens) and is shared by its expert-tensor-parallel shards (expert TP 2: the same tokens)."""
    r = scenario(moe_results, "moe_parity")
    assert r["ep1"]["seeds_shared"] and not any(r["ep1"]["seeds_shared"]), r["ep1"]
    assert r["etp2"]["seeds_shared"] and all(r["etp2"]["seeds_shared"]), r["etp2"]
    assert r["ep2"]["seeds_shared"] == []  # each rank holds other experts


def test_launch_flags_with_num_experts(moe_results):
    """`--mxfp4-backward --num-experts 4 --expert-model-parallel-size 2` through the entry point and
    megatron.training's builder: the local experts are MXFP4 linears, the router is stock."""
    r = scenario(moe_results, "moe_argv")
    assert r["moe"] == "experts" and r["local_experts"] == 2 and r["grads_finite"], r
    assert r["classes"] == ["experts.local_experts.0.linear_fc1:MXFP4ColumnParallelLinear",
                            "experts.local_experts.0.linear_fc2:MXFP4RowParallelLinear",
                            "experts.local_experts.1.linear_fc1:MXFP4ColumnParallelLinear",
                            "experts.local_experts.1.linear_fc2:MXFP4RowParallelLinear", "router:TopKRouter"]


def test_grouped_expert_quantize_equals_per_expert(moe_results):
    """Grouped launches for FC2's dY (dual), X and W and FC1's X and W of all local experts: dX and every
    gradient (FC1 and FC2 dW of each expert) bit-identical to each expert quantizing its own, for RTN and SR, RHT
    g = 64 (per_call, deterministic signs), g = 32 (per_layer) and off, float32 and bfloat16; the experts did
    take the grouped operands: 4 experts, one with 0 tokens (its GEMMs are skipped, nothing is quantized for
    it), so 3 of each kind, in 3 launches (FC2 dual, FC2 X + W, FC1 X + W); none with the grouping off."""
    r = scenario(moe_results, "moe_grouped_quantize")
    assert len(r) == 7, sorted(r)
    hits = {"launches": 3, "grad_output_hits": 3, "input_hits": 3, "weight_hits": 3, "fc1_input_hits": 3,
            "fc1_weight_hits": 3, "released": True}
    for name, case in r.items():
        assert case["equal"], (name, case)
        assert case["used"] == hits, (name, case)
        assert not any(v for k, v in case["off_used"].items() if k != "released"), (name, case)


def test_grouped_weight_operand_is_never_stale(moe_results):
    """A weight updated in place after the forward: before the backward's grouped launches they quantize the
    updated weight (every expert takes its operands); after them (a gradient hook) the weight's version
    changed and the updated expert quantizes its own; under `allow_mutation_on_saved_tensors` the backward
    sees a saved copy of the old weight, other storage than what the group quantized, and the updated experts
    quantize their own. Gradients bit-identical to the per-expert quantizers' in every case."""
    r = scenario(moe_results, "moe_grouped_weight_changed")
    expected = {"before_backward": (3, False), "during_backward": (2, False), "saved_copy": (1, True)}
    for when, (weight_hits, as_not_updated) in expected.items():
        case = r[when]
        assert case["equal"], (when, case)
        assert case["as_not_updated"] == as_not_updated, (when, case)
        used = case["used"]
        assert used["weight_hits"] == used["fc1_weight_hits"] == weight_hits, (when, case)
        assert used["launches"] == 3 and used["input_hits"] == used["fc1_input_hits"] == 3, (when, case)
        assert used["released"], (when, case)


def test_grouped_quantize_falls_back_where_it_does_not_apply(moe_results):
    """A diagnostics-sampled step and an unquantized tail: with the grouping on, no grouped launch, the experts
    quantize their own operands (or run exact GEMMs), the gradients are the grouping-off ones bit for bit and
    the layer's group holds nothing after the backward."""
    r = scenario(moe_results, "moe_grouped_fallback")
    assert sorted(r) == ["sampled", "unquantized_tail"], r
    for name, case in r.items():
        assert case["equal"], (name, case)
        assert case["used"]["released"] and not any(v for k, v in case["used"].items() if k != "released"), case
