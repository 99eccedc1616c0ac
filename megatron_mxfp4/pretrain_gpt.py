"""GPT pretraining with the MXFP4 backward: `python -m megatron_mxfp4.pretrain_gpt` (or under
torchrun) takes every argument of Megatron-LM's `pretrain_gpt.py` (core 0.19) plus the `--mxfp4-*`
flags (`megatron_mxfp4.megatron.args`). Without `--mxfp4-backward` it trains stock Megatron.

It runs against the megatron-core 0.19.2 wheel (which ships `megatron.training`):
- on Python 3.11 `typing.override` is provided before `megatron.training` is imported;
- the dataset helpers ship prebuilt, so `compile_helpers()` (which runs `make` and exits the job
  when the wheel has no Makefile) is skipped in that case.

The data path is Megatron's pretraining path: mock data (`--mock-data`) or indexed datasets
(`--data-path` / per-split paths) through `BlendedMegatronDatasetBuilder`, with tensor-,
pipeline- and context-parallel batch distribution. SFT, FIM, packed sequences (inter-document
masking), hybrid context parallelism, multi-token prediction and cached-logit distillation are
rejected at start-up: run those through a Megatron-LM checkout with the patch in `patches/`.
"""
from __future__ import annotations

import time

_PROGRAM_START_TIME = time.time()

import os  # noqa: E402
import sys  # noqa: E402
from functools import partial  # noqa: E402

from megatron_mxfp4.megatron._compat import avoid_helpers_compile, require_megatron_core, shim_typing_override  # noqa: E402

require_megatron_core()
shim_typing_override()

import torch  # noqa: E402
from megatron.core import mpu  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.parallel_state import get_context_parallel_group  # noqa: E402
from megatron.core.rerun_state_machine import get_rerun_state_machine  # noqa: E402
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer  # noqa: E402
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank, get_batch_on_this_tp_rank  # noqa: E402
from megatron.training import get_args, get_timers, pretrain, print_rank_0, set_startup_timestamps  # noqa: E402
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage  # noqa: E402

from megatron_mxfp4.megatron import add_mxfp4_args, configure_gpt_model_config, recipe_from_args  # noqa: E402

BATCH_FIELDS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
SPIKY_LOSS_FACTOR = 10

_UNSUPPORTED = (  # (args attribute, flag): pretrain_gpt.py features this entry point does not implement
    ("sft", "--sft"),
    ("fim_data", "--fim-data"),
    ("dataloader_inter_document_masking", "--dataloader-inter-document-masking"),
    ("hybrid_context_parallel", "--hybrid-context-parallel"),
    ("mtp_num_layers", "--mtp-num-layers"),
    ("logits_load_dir", "--logits-load-dir"),
    ("overlap_moe_expert_parallel_comm", "--overlap-moe-expert-parallel-comm"),
)


def parse_args():
    """Megatron's full parser plus the `--mxfp4-*` flags (sys.argv), validated."""
    args = parse_and_validate_args(extra_args_provider=add_mxfp4_args,
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    for attr, flag in _UNSUPPORTED:
        if getattr(args, attr, None):
            raise SystemExit(f"megatron_mxfp4.pretrain_gpt: {flag} is not supported by this entry point; use a "
                             "Megatron-LM checkout with patches/megatron-lm-core_v0.19.patch")
    return args


def build_model_config(args):
    """(recipe or None, GPTModelConfig) for the parsed args: with `--mxfp4-backward` the layer spec
    becomes the MXFP4 one (wrapping `--spec` when given) and a pre-wrap hook handles the LM head."""
    recipe = recipe_from_args(args)
    model_cfg = gpt_config_from_args(args)
    configure_gpt_model_config(model_cfg, recipe, args.gradient_accumulation_fusion)
    return recipe, model_cfg


# ----------------------------------------------------------------------------- data

def get_batch(data_iterator, vp_stage=None):
    """(tokens, labels, loss_mask, attention_mask, position_ids) of this rank's micro-batch."""
    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage):
        return (None,) * len(BATCH_FIELDS)
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        raw = next(data_iterator)
        batch = {k: (raw[k].cuda(non_blocking=True) if raw.get(k) is not None else None) for k in BATCH_FIELDS}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size,
        tp_rank=tp_rank, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        mtp_on_this_rank=False, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(), is_pipeline_last_stage=mpu.is_pipeline_last_stage())
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=get_context_parallel_group())
    return tuple(batch.get(k) for k in BATCH_FIELDS)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    """(summed masked loss, token count, report) — megatron.training's loss protocol."""
    args = get_args()
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    rsm = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for bad, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rsm.validate_result(result=loss, rejection_func=bad,
                                message=f"found {what} in local forward loss calculation", tolerance=0.0,
                                fatal=True)
    if args.check_for_spiky_loss:
        rsm.validate_result(result=loss,
                            rejection_func=partial(rsm.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR,
                                                   context="loss"),
                            message="Spiky loss", tolerance=0.0, fatal=False)
    return loss, num_tokens, report


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    if return_schedule_plan:
        raise NotImplementedError("schedule plans (--overlap-moe-expert-parallel-comm) are not supported")
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask, model=model)


def _dataset_on_this_rank(vp_stage=None):
    return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def dataset_config_from_args(args) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation, num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files, tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        fast_cache_load=args.dataloader_fast_cache_load,
        defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        context_parallel_size=args.context_parallel_size, data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    config = dataset_config_from_args(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                             partial(_dataset_on_this_rank, vp_stage=vp_stage), config).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True


def get_embedding_ranks(pp_ranks):
    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1 and not get_args().untie_embeddings_and_output_weights:
        ranks.append(pp_ranks[-1])
    return sorted(set(ranks))


def main():
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    if avoid_helpers_compile():
        print_rank_0("> megatron_mxfp4: dataset helpers are prebuilt in the megatron-core wheel; not compiling")
    args = parse_args()
    recipe, model_cfg = build_model_config(args)
    print_rank_0(f"> megatron_mxfp4: {'MXFP4 backward ' + str(recipe) if recipe else 'stock Megatron (no --mxfp4-backward)'}")
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, forward_step, get_embedding_ranks=get_embedding_ranks)


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    sys.exit(main())
