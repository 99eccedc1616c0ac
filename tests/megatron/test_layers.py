"""MXFP4ColumnParallelLinear / MXFP4RowParallelLinear in 2 processes (worker.py scenarios)."""
import pytest

pytest.importorskip("megatron.core")

from dist_helpers import scenario  # noqa: E402

LAYER_CASES = ["tp1", "tp1_fusion", "tp2", "tp2_fusion", "tp2_sp", "tp2_sp_fusion", "tp2_frozen", "tp2_sp_frozen"]
GPT_CASES = [f"tp{tp}{s}" for tp in (1, 2) for s in ("", "_ddp", "_ddp_overlap", "_ddp_fusion", "_ddp_overlap_fusion")]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_pair_bit_identical_to_stock_with_quantization_off(mcore_results, case):
    """Column -> GELU -> Row: outputs, dX, dW (or FP32 main_grad under fusion) and db are
    bit-identical to megatron-core's layers when the recipe quantizes nothing."""
    r = scenario(mcore_results, "layer_parity")[case]
    assert r.pop("plugin_calls") == 2, "the plugin Function was not used"
    assert all(r.values()), r


@pytest.mark.parametrize("case", GPT_CASES)
def test_gpt_bit_identical_to_stock_with_quantization_off(mcore_results, case):
    """Tiny GPTModel, stock local spec vs MXFP4 spec (identity recipe): loss and every gradient
    (main_grad under mcore DDP) bit-identical; all 4 linears of each of the 2 layers swapped
    (+ the LM head, which takes the plugin's Function under fusion without apex)."""
    r = scenario(mcore_results, "gpt_parity")[case]
    assert r["loss_equal"], r
    assert r["grads_differ"] == [], r
    assert r["no_grad"] == [] and r["n_params"] > 20
    assert r["n_mxfp4_linears"] == (9 if "fusion" in case else 8)


def test_randomness_does_not_touch_dropout(mcore_results):
    """MXFP4 on, dropout 0.1: the loss equals stock (same dropout masks), PyTorch's RNG state after
    forward+backward equals stock, and the quantized gradients differ from but align with stock."""
    r = scenario(mcore_results, "rng_independence")
    assert r["loss_equal"] and r["loss2_equal"] and r["rng_equal"], r
    assert r["n_linear_grads_equal"] == 0, "MXFP4 gradients should differ from the BF16 ones"
    assert r["min_cos"] > 0.8, r


@pytest.mark.parametrize("shape", ["aligned", "odd"])
def test_tp2_gradients_agree_with_tp1_in_the_mean(mcore_results, shape):
    """MXFP4 on (SR + RHT): the mean over seeds of the TP=2 (and TP=2 + SP) gradients converges to
    the exact gradient as the TP=1 mean does (~ single-sample error / sqrt(K)), and the TP=1 and TP=2
    means agree within the sampling noise of two independent means. "odd": hidden 12, FFN 100 (50 per
    rank), 42 tokens: every reduction is zero-padded."""
    r = scenario(mcore_results, "tp_statistics")[shape]
    k = r["K"]
    for key in ("tp1", "tp2", "tp2_sp"):
        single, mean = r[key]["single_err"], r[key]["mean_err"]
        assert 0.05 < single < 1.0, r  # MXFP4 error is present but bounded
        assert mean < 1.6 * single / k ** 0.5, r
    ref = r["tp1"]["single_err"] * (2 / k) ** 0.5
    assert r["tp1_vs_tp2"] < 1.6 * ref and r["tp1_vs_tp2_sp"] < 1.6 * ref, r


def test_configuration_errors_are_clear(mcore_results):
    r = scenario(mcore_results, "errors_and_fallbacks")
    assert "MXFP4Recipe" in r["bad_recipe"]
    assert "delay_wgrad_compute" in r["delay_wgrad"]


def test_any_size_builds_and_runs(mcore_results):
    """Hidden 12, 18 local output features: built; no_grad / eval forwards at 1, 7, 8 tokens (1, 4, 7 per
    rank under SP) equal stock; 0 tokens give zero gradients of the right shapes; float64 is refused at
    the forward in one line naming it and the supported dtypes."""
    r = scenario(mcore_results, "any_size")
    equal = {k: v for k, v in r.items() if k.endswith("_equal")}
    assert len(equal) == 12 and all(equal.values()), equal
    assert r["zero_tokens"] == {"dx": [[0, 2, 12], True], "col_w_main": [[18, 12], True],
                                "row_w_main": [[12, 18], True], "col_b": [[18], True], "row_b": [[12], True]}, r
    for sp in (0, 1):
        msg = r[f"float64_sp{sp}"]
        assert "float64" in msg and "bfloat16" in msg and "\n" not in msg and not msg.startswith("WRONG"), msg


def test_forward_impl_kwargs_are_checked(mcore_results):
    r = scenario(mcore_results, "errors_and_fallbacks")
    assert "some_new_option=3" in r["unknown_kwarg"]
    assert r["future_default_ok"] == "NO ERROR"
    assert "output_dtype" in r["future_nondefault"]
    assert "keyword arguments only" in r["positional"]


def test_uncovered_cases_fall_back_to_stock_with_one_warning(mcore_results):
    r = scenario(mcore_results, "errors_and_fallbacks")
    assert r["fallback_warnings"] == 1 and r["fallback_is_stock"], r


def test_fp8_forward(mcore_results):
    r = scenario(mcore_results, "errors_and_fallbacks")
    assert 0 < r["fp8_rel_err"] < 0.1 and r["fp8_backward_finite"], r


@pytest.mark.parametrize("tp", [1, 2])
def test_gpt_at_megatron_unit_test_sizes(mcore_results, tp):
    """megatron-core's GPT unit-test model (hidden 12, 8 tokens), whose test module needs Transformer Engine
    to import: with the MXFP4 spec, logits equal stock and the gradient is finite and aligned with stock."""
    r = scenario(mcore_results, "gpt_unit_test_sizes")[f"tp{tp}"]
    assert r["logits_equal"] and r["grads_finite"] and r["cosine"] > 0.95, r


def test_sdpa_attention_matches_megatrons_local_attention(mcore_results):
    res = scenario(mcore_results, "sdpa_attention")
    for case, r in res.items():
        if case == "dropout":
            continue
        assert r["n_sdpa"] == 2, case  # one per layer
        assert r["loss_rel"] < 1e-5 and r["grad_rel"] < 1e-4 and r["plugin_grad_rel"] < 1e-4, (case, r)
    assert res["dropout"] == {"finite": True, "differs": True}
