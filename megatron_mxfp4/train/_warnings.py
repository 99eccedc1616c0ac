"""The third-party warnings that `mxfp4-train` silences, all here: each names the package that
warns and why a user of this tool can neither act on it nor fix it. Every other warning, the
plugin's own included, still shows."""
from __future__ import annotations

import logging
import re
import warnings

# (category, module the warning comes from, start of its message)
_WARNINGS = (
    # megatron-core, at import and when building the local layer spec, which needs neither TE nor Apex
    # (the arms that need TE check for it)
    (UserWarning, "megatron", "Transformer Engine and Apex are not installed"),
    (UserWarning, "megatron", "Apex is not installed"),
    (UserWarning, "megatron", "absl.logging is not installed"),
    (DeprecationWarning, "megatron", "The following imports from `dynamic_context.py` will be removed"),
    # torch, when megatron-core's jit_fuser imports torch.compile's inductor at import time
    (DeprecationWarning, "torch", "`torch.jit.script_method` is deprecated"),
    # megatron-core's own TransformerLayer builds the MLP without ffn_hidden_size, and its own
    # RowParallelLinear.forward calls the linear without tp_group
    (DeprecationWarning, "megatron", "MLP requires ffn_hidden_size"),
    (DeprecationWarning, "megatron", "Warning: tp_group is None, using default tp group"),
)

# (logger, start of the message) of log records: megatron-core 0.19 flags GPTModel, the model of
# its GPT examples and of this tool, on every construction
_LOG_RECORDS = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
)


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_third_party() -> None:
    """Install the filters (idempotent); call before megatron-core is imported."""
    for category, module, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category, module=re.escape(module))
    for name, prefix in _LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropRecords(prefix))
