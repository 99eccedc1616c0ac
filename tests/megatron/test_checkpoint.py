"""Checkpoints: the plugin adds no state (DESIGN §7: no persistent buffers)."""
import pytest

pytest.importorskip("megatron.core")

from dist_helpers import scenario  # noqa: E402


def test_state_dict_keys_are_stock_megatron_keys(mcore_results):
    r = scenario(mcore_results, "state_dict")
    assert r["keys_equal"], (r["keys_only_plugin"], r["keys_only_stock"])
    assert r["sharded_keys_equal"]


def test_plugin_checkpoint_loads_into_plain_megatron(mcore_results):
    r = scenario(mcore_results, "state_dict")
    assert r["load_outputs_equal"]
    assert "dist_ckpt_error" not in r, r["dist_ckpt_error"]
    if "dist_ckpt_outputs_equal" in r:  # torch_dist checkpoints need CUDA in megatron-core
        assert r["dist_ckpt_outputs_equal"]
