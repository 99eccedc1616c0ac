"""The grouped quantize reference (`numerics.grouped`) against per-expert `quantize_reference` calls, bit for bit.

Each segment must quantize exactly as the expert's own quantizer does today: its own key (`expert_seed`), the
Philox index restarting at 0, the column copy padded to the segment's own token count.
"""
import pytest
import torch

from megatron_mxfp4.numerics.grouped import grouped_layout, quantize_grouped_reference
from megatron_mxfp4.numerics.quantize import padded_size, quantize_reference
from megatron_mxfp4.numerics.rht import draw_signs
from megatron_mxfp4.numerics.streams import Gemm, Operand, expert_seed, stream_offset

COUNTS = (0, 1, 31, 33, 64, 300)
HIDDEN = 96  # not a multiple of 64: the row copy is padded too
OFF_ROW = stream_offset(17, 5, Gemm.DGRAD, Operand.GRAD_OUTPUT)
OFF_COL = stream_offset(17, 5, Gemm.WGRAD, Operand.GRAD_OUTPUT)


def permuted_buffer(counts, n=HIDDEN, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    x = torch.randn(t, n, generator=g) * torch.exp2(torch.randint(-8, 9, (t, 1), generator=g).float())
    return x.to(dtype)


def seeds_for(n):
    return [expert_seed(1234, 0, e) for e in range(n)]


def assert_same(got, ref, what):
    assert got.shape == ref.shape and got.dim == ref.dim, (what, got.shape, ref.shape)
    assert got.prescale == ref.prescale and got.rht_block == ref.rht_block, what
    assert got.data.shape == ref.data.shape and torch.equal(got.data, ref.data), f"{what}: data differ"
    assert got.scales.shape == ref.scales.shape and torch.equal(got.scales, ref.scales), f"{what}: scales differ"
    if ref.signs is not None:
        assert torch.equal(got.signs, ref.signs), f"{what}: signs differ"


@pytest.mark.parametrize("g", (0, 32, 64))
@pytest.mark.parametrize("rounding", ("sr", "rtn"))
@pytest.mark.parametrize("mode", ("row", "col", "dual"))
def test_grouped_equals_per_expert(g, rounding, mode):
    x = permuted_buffer(COUNTS, seed=g)
    segs = torch.split(x, list(COUNTS))
    seeds = seeds_for(len(COUNTS))
    out = quantize_grouped_reference(segs, mode, rounding, rht_block=g, seeds=seeds, offset_row=OFF_ROW,
                                     offset_col=OFF_COL)
    assert len(out) == len(COUNTS)
    for e, (xe, seed) in enumerate(zip(segs, seeds)):
        row_ref = quantize_reference(xe, -1, rounding, None, g, None, seed, OFF_ROW)
        col_ref = quantize_reference(xe.t(), -1, rounding, None, g, None, seed, OFF_COL)
        if mode == "row":
            assert_same(out[e], row_ref, f"row {e}")
        elif mode == "col":
            assert_same(out[e], col_ref, f"col {e}")
            assert out[e].data.shape[1] * 2 == padded_size(COUNTS[e], g)  # its own K_e
        else:
            assert_same(out[e][0], row_ref, f"dual row {e}")
            assert_same(out[e][1], col_ref, f"dual col {e}")


def test_row_copies_are_one_matrix_and_views_share_buffers():
    """With equal feature counts the row copies are the rows of one [T_total, Kr/2] matrix, every segment a
    contiguous view into it (the per-expert GEMMs read them without copies)."""
    x = permuted_buffer(COUNTS)
    out = quantize_grouped_reference(torch.split(x, list(COUNTS)), "dual", "sr", rht_block=64, seeds=seeds_for(6),
                                     offset_row=OFF_ROW, offset_col=OFF_COL)
    rows = [r for r, _ in out]
    base = rows[0].data.untyped_storage().data_ptr()
    assert all(r.data.untyped_storage().data_ptr() == base and r.data.is_contiguous() for r in rows)
    whole = torch.cat([r.data for r in rows])
    start = rows[0].data.storage_offset()
    flat = rows[0].data.untyped_storage()
    mat = torch.empty(0, dtype=torch.uint8).set_(flat, start, whole.shape)
    assert torch.equal(mat, whole)
    cols = [c for _, c in out]
    assert all(c.data.untyped_storage().data_ptr() == cols[0].data.untyped_storage().data_ptr() for c in cols)
    assert all(c.data.is_contiguous() and c.scales.is_contiguous() for c in cols)


def test_seed_and_index_restart_matter():
    """Negative controls: one key for all segments, or the Philox index running on across segments (the
    whole buffer quantized at once), do not give the per-expert bits."""
    counts = (40, 72)
    x = permuted_buffer(counts, seed=3)
    segs = torch.split(x, list(counts))
    seeds = seeds_for(2)
    good = quantize_grouped_reference(segs, "row", "sr", seeds=seeds, offset_row=OFF_ROW)
    same_key = quantize_grouped_reference(segs, "row", "sr", seeds=seeds[0], offset_row=OFF_ROW)
    assert torch.equal(good[0].data, same_key[0].data)
    assert not torch.equal(good[1].data, same_key[1].data)
    whole = quantize_reference(x, -1, "sr", None, 0, None, seeds[1], OFF_ROW)
    assert not torch.equal(whole.data[counts[0]:], good[1].data)  # index restarts per segment


def test_per_segment_offsets_signs_and_tensor_scalars():
    counts = (33, 0, 64)
    x = permuted_buffer(counts, dtype=torch.float32, seed=5)
    segs = torch.split(x, list(counts))
    seeds = seeds_for(3)
    offs = [OFF_COL + (e << 8) for e in range(3)]
    given = [draw_signs(64, 7, e) for e in range(3)]
    given[1] = None  # drawn for this one
    out = quantize_grouped_reference(segs, "col", "sr", rht_block=64,
                                     seeds=[torch.tensor([s - (1 << 64) if s >= 1 << 63 else s]) for s in seeds],
                                     offset_col=[torch.tensor([o]) for o in offs], signs_col=given)
    for e in range(3):
        ref = quantize_reference(segs[e].t(), -1, "sr", None, 64, given[e], seeds[e], offs[e])
        assert_same(out[e], ref, f"segment {e}")


def test_sign_offset_draws_another_operands_signs():
    """`sign_offset_col` draws the signs the dY quantizer of the same GEMM draws (per_call policy), while the
    dither stays at the copy's own offset."""
    counts = (50, 20)
    x = permuted_buffer(counts, seed=9)
    segs = torch.split(x, list(counts))
    seeds = seeds_for(2)
    off_x = stream_offset(17, 5, Gemm.WGRAD, Operand.INPUT)
    out = quantize_grouped_reference(segs, "col", "sr", rht_block=32, seeds=seeds, offset_col=off_x,
                                     sign_offset_col=OFF_COL)
    for e in range(2):
        signs = draw_signs(32, seeds[e], OFF_COL)
        ref = quantize_reference(segs[e].t(), -1, "sr", None, 32, signs, seeds[e], off_x)
        assert_same(out[e], ref, f"segment {e}")
        assert not torch.equal(out[e].signs, draw_signs(32, seeds[e], off_x))


def test_layout_sizes_and_errors():
    lay = grouped_layout([(0, 96), (33, 96), (300, 80)], "dual", 64)
    assert [s.row_k for s in lay.segments] == [128, 128, 128]
    assert [s.col_k for s in lay.segments] == [0, 64, 320]
    assert lay.row_data_bytes == (0 + 33 + 300) * 64
    assert lay.col_data_bytes == 96 * 32 + 80 * 160
    assert lay.segments[2].col_data == 96 * 32
    # every block starts 16-byte aligned: segment 1's row scales take 33 * 4 = 132 bytes, padded to 144
    assert lay.segments[2].row_scales == 144 and all(s.row_scales % 16 == 0 and s.col_scales % 16 == 0
                                                     for s in lay.segments)
    with pytest.raises(ValueError, match="mode"):
        grouped_layout([(1, 32)], "both", 0)
    with pytest.raises(ValueError, match="segments"):
        quantize_grouped_reference([torch.zeros(2, 32)] * 2, "row", seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="segment 1"):
        quantize_grouped_reference([torch.zeros(2, 32), torch.zeros(2, 32, dtype=torch.float16)], "row")


def test_dispatch_reference_and_cuda_refusal():
    from megatron_mxfp4.ops.grouped import quantize_mxfp4_grouped

    counts = (5, 0, 40)
    segs = torch.split(permuted_buffer(counts, seed=2), list(counts))
    kw = dict(rht_block=32, seeds=seeds_for(3), offset_row=OFF_ROW, offset_col=OFF_COL)
    got = quantize_mxfp4_grouped(segs, "dual", "sr", **kw)  # auto on CPU: the reference
    want = quantize_grouped_reference(segs, "dual", "sr", **kw)
    for (a, b), (c, d) in zip(got, want):
        assert_same(a, c, "row")
        assert_same(b, d, "col")
    with pytest.raises(RuntimeError, match="cannot run"):
        quantize_mxfp4_grouped(segs, "dual", "sr", backend="cuda", **kw)
    with pytest.raises(ValueError, match="backend"):
        quantize_mxfp4_grouped(segs, "dual", "sr", backend="triton", **kw)


class _HostKernel:
    """A stand-in for the extension's grouped launch that runs on CPU memory: it reads the segment table the
    dispatcher builds (pointers, sizes, keys, offsets, signs) and writes each copy with `quantize_reference`
    through the raw pointers, as the kernel does. It checks the dispatcher's table, layouts, chunking and
    fallbacks without a GPU; the kernel's own numerics are checked against the reference in tests/gpu."""

    GROUP_SEGMENT_FIELDS = 24
    GROUP_MAX_SEGMENTS = 32

    def __init__(self):
        self.launches = []

    @staticmethod
    def tile_shape(dcode, g, mode):
        return (0, 0) if (dcode == 0 and g == 256 and mode == 3) else (64, 64)

    def quantize_grouped(self, dcode, g, mode, sr, table_addr, nseg, prescale, hscale, stream):
        import ctypes

        assert nseg <= self.GROUP_MAX_SEGMENTS
        self.launches.append((mode, nseg))
        tab = list((ctypes.c_int64 * (nseg * 24)).from_address(table_addr))
        dtype = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}[dcode]
        sz = torch.empty(0, dtype=dtype).element_size()

        def u64(ptr, val):
            v = ctypes.c_int64.from_address(ptr).value if ptr else val
            return v & (2**64 - 1)

        def write(ptr, t):
            b = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
            if b:
                ctypes.memmove(ptr, b, len(b))

        for s in range(nseg):
            f = tab[24 * s: 24 * s + 24]
            x_ptr, rows, cols, ld = f[0:4]
            if rows and cols:
                n = (rows - 1) * ld + cols
                raw = bytearray((ctypes.c_char * (n * sz)).from_address(x_ptr))
                x = torch.frombuffer(raw, dtype=dtype).as_strided((rows, cols), (ld, 1))
            else:
                x = torch.zeros(rows, cols, dtype=dtype)
            seed = u64(f[14], f[15])
            for bit, (data, scales, k, sig, sig_out, op, ov, sp, sv) in (
                    (1, (f[4], f[5], f[6], f[10], f[11], f[16], f[17], f[20], f[21])),
                    (2, (f[7], f[8], f[9], f[12], f[13], f[18], f[19], f[22], f[23]))):
                if not mode & bit:
                    continue
                signs = None
                if g:
                    if sig:
                        signs = torch.tensor(list((ctypes.c_float * g).from_address(sig)), dtype=torch.float32)
                    else:
                        signs = draw_signs(g, seed, u64(sp, sv))
                        if sig_out:
                            write(sig_out, signs)
                xc = x if bit == 1 else x.t()
                q = quantize_reference(xc, -1, "sr" if sr else "rtn", prescale, g, signs, seed, u64(op, ov))
                assert q.data.shape[-1] * 2 == k or (q.data.numel() == 0)
                if q.data.numel():
                    write(data, q.data)
                    write(scales, q.scales)


@pytest.mark.parametrize("dtype,g,mode", [(torch.bfloat16, 64, "dual"), (torch.float32, 256, "dual"),
                                          (torch.float16, 0, "row"), (torch.float32, 32, "col")])
def test_dispatcher_table_on_host_memory(monkeypatch, dtype, g, mode):
    from megatron_mxfp4.ops import cuda_quantize as cq
    from megatron_mxfp4.ops import grouped as gq

    fake = _HostKernel()
    monkeypatch.setattr(cq, "_ext", fake)
    monkeypatch.setattr(gq, "supports", lambda x: None)
    monkeypatch.setattr(cq, "current_stream_handle", lambda d: 0)
    counts = [0, 1, 31, 33, 64, 300] * 6  # 36 segments: two launches per copy
    x = permuted_buffer(counts, n=96, dtype=dtype, seed=g)
    segs = list(torch.split(x, counts))
    segs[3] = permuted_buffer([33], n=90, dtype=dtype, seed=1)  # another width, rows not whole 16-byte chunks
    seeds = [torch.tensor([s - (1 << 64) if s >= 1 << 63 else s]) if i % 2 else s
             for i, s in enumerate(seeds_for(len(segs)))]
    signs = [draw_signs(g, 3, i) if (g and i % 3 == 0) else None for i in range(len(segs))]
    kw = dict(rht_block=g, seeds=seeds, offset_row=OFF_ROW, offset_col=[OFF_COL + (i << 8) for i in range(len(segs))],
              signs_row=signs, sign_offset_col=torch.tensor([OFF_ROW]) if mode == "col" else None)
    monkeypatch.setattr(cq, "_warned", set())
    with pytest.warns(RuntimeWarning, match="copied"):  # segment 3's rows are not whole 16-byte chunks
        got = gq.quantize_grouped_cuda(segs, mode, "sr", **kw)
    want = quantize_grouped_reference(segs, mode, "sr", **kw)
    launches = 2 if not (dtype == torch.float32 and g == 256 and mode == "dual") else 4
    assert len(fake.launches) == launches and max(n for _, n in fake.launches) == 32
    for e, (a, b) in enumerate(zip(got, want)):
        pairs = zip(a, b) if mode == "dual" else [(a, b)]
        for qa, qb in pairs:
            assert_same(qa, qb, f"segment {e}")
