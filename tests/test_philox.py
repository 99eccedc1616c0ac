"""Philox4x32-10 against the Random123 known-answer vectors, and the project's stream contract."""
import torch

from megatron_mxfp4.numerics.philox import (
    DOMAIN_SIGNS, bytes_from_words, dither_bytes, philox4x32_10, random_signs, random_words,
)
from megatron_mxfp4.numerics.streams import Gemm, Operand, derive_seed, stream_offset

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> output[4].
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_known_answer_vectors():
    for ctr, key, want in KAT:
        out = philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in ctr], *key)
        assert [int(o) for o in out] == list(want)


def test_stream_layout_matches_contract():
    seed, offset = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    words = random_words(seed, offset, 12)
    for i in range(12):
        blk = i // 4
        ctr = (blk, 0, offset & 0xFFFFFFFF, offset >> 32)
        out = philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in ctr], seed & 0xFFFFFFFF, seed >> 32)
        assert int(words[i]) == int(out[i % 4])
    signs_words = random_words(seed, offset, 4, DOMAIN_SIGNS)
    ctr = (0, 1 << 31, offset & 0xFFFFFFFF, offset >> 32)
    out = philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in ctr], seed & 0xFFFFFFFF, seed >> 32)
    assert [int(w) for w in signs_words] == [int(o) for o in out]


def test_same_key_same_bits_different_key_different_bits():
    a = random_words(7, 11, 4096)
    assert torch.equal(a, random_words(7, 11, 4096))
    for other in (random_words(7, 12, 4096), random_words(8, 11, 4096), random_words(7, 11, 4096, DOMAIN_SIGNS)):
        assert (a == other).float().mean() < 0.01  # independent 32-bit words collide with p = 2^-32


def test_dither_bytes_layout_matches_contract():
    """Contract v2: element i takes byte i % 4 (little-endian) of word (i // 4) % 4 of the Philox call
    with block counter i // 16, so one call feeds 16 consecutive elements."""
    seed, offset = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    r = dither_bytes(seed, offset, (3, 16))  # 48 elements: three calls
    assert r.dtype == torch.int64 and r.shape == (3, 16)
    for i in range(48):
        ctr = (i // 16, 0, offset & 0xFFFFFFFF, offset >> 32)
        out = philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in ctr], seed & 0xFFFFFFFF, seed >> 32)
        word = int(out[(i // 4) % 4])
        assert int(r.flatten()[i]) == (word >> (8 * (i % 4))) & 0xFF
    assert bytes_from_words(torch.tensor([0x04030201])).tolist() == [1, 2, 3, 4]
    # A shape whose size is not a multiple of 4 takes the first bytes of the same stream.
    assert torch.equal(dither_bytes(seed, offset, (7,)), r.flatten()[:7])


def test_dither_bytes_are_uniform():
    """Chi-square over the 256 values of 2^20 bytes (255 degrees of freedom): the 1e-6 upper quantile is
    ~380; a stream with one stuck bit (negative control) scores in the hundreds of thousands."""
    r = dither_bytes(3, 5, (1 << 20,))
    expected = r.numel() / 256

    def chi2(t):
        return ((torch.bincount(t, minlength=256).double() - expected) ** 2 / expected).sum().item()

    assert chi2(r) < 380
    assert chi2(r | 1) > 1e5


def test_signs_are_balanced_rademacher():
    s = random_signs(1, 2, 1 << 16)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(s.mean().item()) < 0.02  # sigma = 0.0039


def test_offsets_are_distinct_across_layers_calls_gemms_operands():
    seen = set()
    for layer in (0, 1, 65535):
        for call in (0, 1, 2**40 - 1):
            for gemm in Gemm:
                for op in Operand:
                    seen.add(stream_offset(layer, call, gemm, op))
    assert len(seen) == 3 * 3 * len(Gemm) * len(Operand)
    assert all(0 <= s < 2**64 for s in seen)


def test_seed_depends_on_data_parallel_rank():
    seeds = {derive_seed(1234, r) for r in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2**64 for s in seeds)
    assert derive_seed(1234, 0) == derive_seed(1234, 0)


def test_host_and_tensor_paths_give_the_same_words(monkeypatch):
    """Short streams (RHT signs) are computed with NumPy on the host; long ones with torch ops."""
    from megatron_mxfp4.numerics import philox

    cases = [(0, 0, 0), (2**64 - 1, 2**64 - 1, 1), (123456789123, 987654321987654, 0)]
    host = {(c, n): philox.random_words(*c[:2], n, c[2]) for c in cases for n in (1, 5, 64, 256)}
    monkeypatch.setattr(philox, "HOST_WORDS_MAX", -1)
    for (c, n), words in host.items():
        assert torch.equal(words, philox.random_words(*c[:2], n, c[2]))


def test_signs_finished_on_the_host_equal_the_device_formula():
    from megatron_mxfp4.numerics.philox import DOMAIN_SIGNS, HOST_WORDS_MAX, random_signs, random_words

    for n in (32, 64, HOST_WORDS_MAX, HOST_WORDS_MAX + 4):  # both sides of the host/device switch
        w = random_words(11, 2**40 + 3, n, DOMAIN_SIGNS)
        s = random_signs(11, 2**40 + 3, n)
        assert s.dtype == torch.float32 and torch.equal(s, 1.0 - 2.0 * (w >> 31).to(torch.float32))
        assert 0 < int((s < 0).sum()) < n
