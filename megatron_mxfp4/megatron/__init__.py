"""Megatron-Core integration (DESIGN §6): MXFP4-backward tensor-parallel linears, the GPT layer
spec, the launch flags. Needs megatron-core (pinned 0.19.2) and triton."""
from ._compat import require_megatron_core, shim_typing_override

require_megatron_core()
shim_typing_override()  # megatron.training on Python 3.11

from .args import add_mxfp4_args, recipe_from_args  # noqa: E402
from .function import MXFP4ParallelLinearFunction, mxfp4_parallel_linear  # noqa: E402
from .layers import MXFP4ColumnParallelLinear, MXFP4RowParallelLinear, unquantized  # noqa: E402
from .spec import (  # noqa: E402
    MXFP4LayerSpecProvider,
    MXFP4TransformerLayer,
    allow_fusion_without_apex,
    check_fusion_covered,
    configure_from_args,
    configure_gpt_model_config,
    convert_output_layer,
    fusion_without_apex,
    get_gpt_layer_spec,
    lm_head_pre_wrap_hook,
    swap_linear_specs,
)

__all__ = [
    "MXFP4ColumnParallelLinear", "MXFP4RowParallelLinear", "MXFP4ParallelLinearFunction", "MXFP4TransformerLayer",
    "MXFP4LayerSpecProvider", "add_mxfp4_args", "allow_fusion_without_apex", "check_fusion_covered",
    "configure_from_args", "configure_gpt_model_config", "convert_output_layer", "fusion_without_apex", "get_gpt_layer_spec",
    "lm_head_pre_wrap_hook", "mxfp4_parallel_linear", "recipe_from_args", "swap_linear_specs", "unquantized",
]
