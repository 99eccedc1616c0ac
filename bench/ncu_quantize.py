"""Launch the quantize kernels once each for Nsight Compute (no timing): rowwise RTN g = 0 (the memory path
alone), rowwise SR g = 64 and dual SR g = 64 on a [8192, 16384] BF16 tensor.

    ncu --clock-control none -k regex:quantize_kernel --section SpeedOfLight ... python bench/ncu_quantize.py
"""
import torch

from megatron_mxfp4.numerics.rht import draw_signs
from megatron_mxfp4.ops import quantize_mxfp4, quantize_mxfp4_dual

x = torch.randn(8192, 16384, device="cuda").to(torch.bfloat16)
s = draw_signs(64, 1, 2, "cuda")
quantize_mxfp4(x, -1, rounding="rtn", rht_block=0, backend="cuda")
quantize_mxfp4(x, -1, rounding="sr", rht_block=64, signs=s, seed=7, offset=1, backend="cuda")
quantize_mxfp4_dual(x, rounding="sr", rht_block=64, signs_row=s, signs_col=s, seed=7, offset_row=1, offset_col=2,
                    backend="cuda")
torch.cuda.synchronize()
