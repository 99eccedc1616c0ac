"""Process groups, random seeds and the megatron-core GPT model of one training arm.

Runs on a GPU (single process or `torchrun`, tensor and data parallel) and on a CPU (one process;
megatron-core needs three CPU shims there: `torch.cuda.current_device` returns the CPU device,
`torch.cuda.current_stream` is a no-op stream, and the RNG tracker is created in "inference" mode,
so dropout draws from PyTorch's default generator).

Every arm of a run is built from the same seed with `use_cpu_initialization` (the master weights
are drawn on the CPU in one fixed order, independent of the tensor-parallel size and of the arm's
linear classes); an arm whose linears come from Transformer Engine gets the same initial values
copied in from the local-spec model (`copy_initial_values`).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from .._cpu_shims import install_cpu_shims
from .arms import Arm
from .errors import UsageError


def import_megatron():
    """Import megatron-core (and the plugin's Megatron integration) with a clear error."""
    try:
        from .. import megatron as plugin  # noqa: F401  (requires megatron-core, shims typing.override)
    except ImportError as e:
        raise UsageError(f"mxfp4-train needs megatron-core (pip install 'megatron-mxfp4[megatron]'): {e}") from e
    return plugin


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def check_te(arm: Arm, impl: str) -> None:
    """Refuse an arm that needs Transformer Engine when it cannot be imported."""
    if (impl == "transformer_engine" or arm.te_fp8) and not te_available():
        what = f"arm {arm.name!r}" if arm.te_fp8 else "--transformer-impl transformer_engine"
        raise UsageError(f"{what} needs Transformer Engine (import transformer_engine.pytorch failed); install "
                         "it or drop the arm / use --transformer-impl local")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    tp: int
    dp: int
    dp_rank: int
    tp_rank: int
    device: torch.device


def init_distributed(device: str, tp: int, seed: int) -> Dist:
    """Process group (torchrun environment, else a single process), megatron parallel state, seeds."""
    import megatron.core.parallel_state as ps

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world % tp:
        raise UsageError(f"--tp {tp} does not divide the number of processes {world} (start them with torchrun)")
    if device == "cpu":
        install_cpu_shims(force=True)  # --device cpu on a GPU machine too
        dev = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if world > 1:
            torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        else:
            torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0,
                                                 world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    elif ps.get_tensor_model_parallel_world_size() != tp:
        raise RuntimeError("model parallel state already initialized with another TP size")
    seed_all(seed, device)
    return Dist(rank=rank, world=world, local_rank=local_rank, tp=tp, dp=world // tp,
                dp_rank=ps.get_data_parallel_rank(), tp_rank=ps.get_tensor_model_parallel_rank(), device=dev)


def seed_all(seed: int, device: str) -> None:
    """The same seeds for every arm: PyTorch's generators and megatron's RNG tracker."""
    from megatron.core.tensor_parallel import random as tp_random

    torch.manual_seed(seed)
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        tp_random.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    else:
        tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def transformer_config(cfg, arm: Arm, dtype: torch.dtype, tp: int, sequence_parallel: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = {"add_bias_linear": True}
    if arm.te_fp8:  # TE's delayed scaling, as the FP8 baseline of bench/ (te_fp8_delayed: amax history 16, max)
        kw.update(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max")
    if cfg.experts:
        # the allgather dispatcher runs anywhere (alltoall's needs CUDA streams); no linear biases:
        # megatron-core 0.19's expert MLP adds its bias in place onto a custom Function's output view
        kw.update(num_moe_experts=cfg.experts, moe_router_topk=cfg.topk, moe_token_dispatcher_type="allgather",
                  moe_aux_loss_coeff=1e-2, add_bias_linear=False)
    return TransformerConfig(
        num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads, ffn_hidden_size=cfg.ffn,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
        use_cpu_initialization=True, perform_initialization=True, init_method_std=cfg.init_std,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=False,
        hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        normalization="LayerNorm", cuda_graph_modules=[], **kw)  # [] = whole layer; the default "full" is deprecated


def layer_spec(arm: Arm, impl: str, num_experts=None):
    """The transformer-layer spec of an arm: megatron-core's local or TE spec (MoE MLPs with
    `num_experts`), with the plugin's MXFP4 linears swapped in when the arm has a recipe; impl
    "local_sdpa": the local spec with PyTorch's fused attention (`megatron.attention.use_sdpa`)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    check_te(arm, impl)
    use_te = impl == "transformer_engine" or arm.te_fp8
    if arm.recipe is None:
        if use_te:
            return specs.get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts)
        spec = specs.get_gpt_layer_local_spec(num_experts=num_experts)
    else:
        from ..megatron import get_gpt_layer_spec

        spec = get_gpt_layer_spec(arm.recipe, transformer_engine=use_te, num_experts=num_experts)
    if impl == "local_sdpa" and not use_te:
        from ..megatron.attention import use_sdpa

        use_sdpa(spec)
    return spec


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    step = multiple * tp
    return (vocab + step - 1) // step * step


def new_gpt(cfg, arm: Arm, tp: int, dtype: torch.dtype, impl: str, vocab_size: int, sequence_parallel: bool = False):
    """The bare GPTModel of an arm, initialized from the current random state (on the CPU, or on the
    default device in effect: "meta" builds it without memory or initialization)."""
    from megatron.core.models.gpt import GPTModel

    gpt = GPTModel(config=transformer_config(cfg, arm, dtype, tp, sequence_parallel),
                   transformer_layer_spec=layer_spec(arm, impl, cfg.experts or None),
                   vocab_size=padded_vocab(vocab_size, tp),
                   max_sequence_length=cfg.seq_length, position_embedding_type="learned_absolute",
                   share_embeddings_and_output_weights=True)
    if arm.recipe is not None and arm.recipe.lm_head:
        from ..megatron import convert_output_layer

        convert_output_layer(gpt, arm.recipe)
    return gpt


def check_model(cfg, arm: Arm, dist: Dist, dtype: torch.dtype, vocab_size: int) -> None:
    """What building and running the arm's model would refuse, found without training: the arm's
    kernel backend on this device, and the checks of megatron-core's config and layers and of the
    plugin's layers, by building the model on the "meta" device (no memory, no random draws). The
    local spec stands in for the TE spec (the plugin's linears are the same; TE's modules allocate
    on a device of their own), and the te-fp8 arm, all TE, is left to its own build."""
    r = arm.recipe
    if r is not None and r.backward_format == "mxfp4" and r.backend != "auto":
        from ..ops import available_backends

        probe = torch.empty(0, device=dist.device)
        for kind, name in (("quantize", r.quantize_backend), ("gemm", r.gemm_backend)):
            here = available_backends(probe, kind)
            if name != "auto" and name not in here:
                raise UsageError(f"--mxfp4-backend {r.backend}: no {name} {kind} kernel can run on "
                                 f"{dist.device.type} here (available: {', '.join(here)})")
    if not arm.te_fp8:
        with torch.device("meta"):
            new_gpt(cfg, arm, dist.tp, dtype, "local", vocab_size)


def build_model(cfg, arm: Arm, dist: Dist, dtype: torch.dtype, impl: str, vocab_size: int, seed: int,
                sequence_parallel: bool = False):
    """(DDP-wrapped model, the bare GPTModel): built under `seed` on the CPU, moved to the device."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    seed_all(seed, dist.device.type)
    gpt = new_gpt(cfg, arm, dist.tp, dtype, impl, vocab_size, sequence_parallel)
    if arm.te_fp8 or impl == "transformer_engine":
        copy_initial_values(gpt, cfg, dist, dtype, vocab_size, seed)
    gpt.to(dist.device)
    module = Float16Module(gpt.config, gpt) if dtype == torch.bfloat16 else gpt
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False, check_for_nan_in_grad=False)
    model = DistributedDataParallel(config=gpt.config, ddp_config=ddp_cfg, module=module)
    seed_all(seed, dist.device.type)  # the generators start every arm's training in the same state
    return model, gpt


_TE_KEY_MAP = (("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
               ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."))


def copy_initial_values(gpt, cfg, dist: Dist, dtype, vocab_size: int, seed: int) -> None:
    """Give a model built with TE classes the initial values of the local-spec model of the same
    seed (fused-LayerNorm keys mapped), so that every arm starts from the same point."""
    from .arms import ARMS

    seed_all(seed, dist.device.type)
    ref = new_gpt(cfg, ARMS["bf16"], dist.tp, dtype, "local", vocab_size)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            src = name
            for te_key, local_key in _TE_KEY_MAP:
                src = src.replace(te_key, local_key)
            if src not in ref_params:
                raise KeyError(f"initial values: no local-spec parameter for {name!r}")
            p.copy_(ref_params[src].to(p.dtype))
    del ref
