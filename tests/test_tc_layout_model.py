"""The tensor-core quantize kernel's data flow (csrc/mxfp4_quantize_tc.cu) on one 64 x 64 tile, modelled on the CPU
with the PTX fragment layouts of `ldmatrix` (.x4, .trans) and `mma.m16n8k16` (row.col): the kernel's shared-memory
swizzle, ldmatrix addresses, transform matrices (diag(s)·H with the permuted outputs) and the registers it hands
each mma are transcribed here (keep them in step with the kernel), and every accumulator a lane holds must be the
transform output its epilogue takes it for (row copy: logical column 16t + 2j + b of row g + 8h; column copy:
logical row 8g + 2m + h of column 16w + 8n + 2t + b). The kernel itself runs only on a GPU
(tests/gpu/test_quantize_tc.py); this catches index mistakes on the CPU.
"""
import numpy as np

T = 64


def tc_offset(r, c):
    return r * T + (((c >> 3) ^ (r & 7)) << 3) + (c & 7)


def popc(x):
    return bin(x).count("1")


def row_logical(n):
    return 16 * ((n & 7) >> 1) + 2 * (n >> 3) + (n & 1)


def col_logical(q):
    return 8 * (q & 7) + 2 * (q >> 4) + ((q >> 3) & 1)


def ldsm(sm, addr_of_lane, trans=False):
    """ldmatrix.x4: lane 8i + j addresses row j of matrix i; register i of lane L holds matrix i's (row L/4,
    columns 2(L%4), 2(L%4)+1), of the transposed matrix with .trans."""
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        m = np.array([sm[addr_of_lane(8 * i + j): addr_of_lane(8 * i + j) + 8] for j in range(8)])
        if trans:
            m = m.T
        for lane in range(32):
            regs[lane][i] = (m[lane // 4, 2 * (lane % 4)], m[lane // 4, 2 * (lane % 4) + 1])
    return regs


def mma(acc, a, b0, b1):
    """mma.m16n8k16.row.col: acc[lane] (c0..c3) += A . B with the PTX register layouts."""
    am, bm = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        am[g, 2 * t:2 * t + 2], am[g + 8, 2 * t:2 * t + 2] = a[lane][0], a[lane][1]
        am[g, 2 * t + 8:2 * t + 10], am[g + 8, 2 * t + 8:2 * t + 10] = a[lane][2], a[lane][3]
        bm[2 * t:2 * t + 2, g], bm[2 * t + 8:2 * t + 10, g] = b0[lane], b1[lane]
    d = am @ bm
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i, (r, c) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
            acc[lane][i] += d[r, c]


def mismatches(swap_row_b=False, col_map=col_logical, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(-8, 8, size=(T, T)).astype(np.float64)
    srow, scol = rng.integers(0, 2, T), rng.integers(0, 2, T)  # 1: a negative sign
    h = np.array([[(-1) ** popc(i & j) for j in range(T)] for i in range(T)], dtype=np.float64)
    ref_row = (x * np.where(srow == 1, -1, 1)) @ h.T                         # [r, L]
    ref_col = (x * np.where(scol == 1, -1, 1)[:, None]).T @ h.T              # [c, L]
    smx, smb, sma = np.zeros(T * T), np.zeros(T * T), np.zeros(T * T)
    for r in range(T):  # the kernel's build_transforms and tile layout
        for c in range(T):
            smx[tc_offset(r, c)] = x[r, c]
            smb[tc_offset(r, c)] = -1.0 if (popc(c & row_logical(r)) & 1) != (srow[c] != 0) else 1.0
            sma[tc_offset(r, c)] = -1.0 if (popc(c & col_map(r)) & 1) != (scol[c] != 0) else 1.0
    bad = 0
    for warp in range(4):
        acc = [[[0.0] * 4 for _ in range(32)] for _ in range(8)]
        for kk in range(4):
            a = ldsm(smx, lambda l: tc_offset(16 * warp + (l & 7) + 8 * ((l >> 3) & 1), 16 * kk + 8 * (l >> 4)))
            for jj in range(4):
                b = ldsm(smb, lambda l: tc_offset(16 * jj + (l & 7) + 8 * (l >> 4), 16 * kk + 8 * ((l >> 3) & 1)))
                hi = (3, 2) if swap_row_b else (2, 3)
                mma(acc[2 * jj], a, [v[0] for v in b], [v[1] for v in b])
                mma(acc[2 * jj + 1], a, [v[hi[0]] for v in b], [v[hi[1]] for v in b])
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for hh in range(2):
                for j in range(8):
                    for bb in range(2):
                        bad += acc[j][lane][2 * hh + bb] != ref_row[16 * warp + g + 8 * hh, 16 * t + 2 * j + bb]
        acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(2)] for _ in range(4)]
        for kk in range(4):
            b = ldsm(smx, lambda l: tc_offset(16 * kk + (l & 7) + 8 * ((l >> 3) & 1), 16 * warp + 8 * (l >> 4)),
                     trans=True)
            for m in range(4):
                a = ldsm(sma, lambda l: tc_offset(16 * m + (l & 7) + 8 * ((l >> 3) & 1), 16 * kk + 8 * (l >> 4)))
                mma(acc[m][0], a, [v[0] for v in b], [v[1] for v in b])
                mma(acc[m][1], a, [v[2] for v in b], [v[3] for v in b])
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for n in range(2):
                for bb in range(2):
                    col = 16 * warp + 8 * n + 2 * t + bb
                    for m in range(4):
                        for hh in range(2):
                            bad += acc[m][n][lane][bb + 2 * hh] != ref_col[col, 8 * g + 2 * m + hh]
    return bad


def test_every_lane_holds_the_outputs_its_epilogue_takes():
    assert mismatches() == 0


def test_the_model_sees_a_wrong_register_or_permutation():
    assert mismatches(swap_row_b=True) > 1000
    assert mismatches(col_map=lambda q: 8 * (q & 7) + 2 * ((q >> 3) & 1) + (q >> 4)) > 1000
