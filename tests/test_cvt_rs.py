"""The cvt.rs self-test on CPU: its probe table, the CPU twin of the kernels' feed, and the calibration against
models of how Blackwell's `cvt.rs.satfinite.e2m1x4.f32` might decide (the instruction itself cannot run here).

The point of the feeds: whichever of these plausible rules the hardware has, some feed makes it reproduce the
contract's rule (DESIGN §2.2) on every probe value and byte, and a rule no feed fixes is refused with a reason.
"""
import warnings

import pytest
import torch

from megatron_mxfp4.numerics.format import E2M1_VALUES, round_sr
from megatron_mxfp4.ops import cvt_rs

GRID = torch.tensor(E2M1_VALUES, dtype=torch.float32)


def _interval(v):
    """(lower grid code, f) of |v| as a hardware rule would see them (saturating at 6)."""
    a = v.abs()
    lo = (torch.bucketize(a, GRID, right=True) - 1).clamp(0, 7)
    top = lo == 7
    gap = torch.where(top, torch.ones_like(a), GRID[(lo + 1).clamp(max=7)] - GRID[lo])
    f = torch.where(top, torch.zeros_like(a), (a - GRID[lo]) / gap)
    return lo, f


def _codes(v, lo, up):
    mag = (lo + up.to(lo.dtype)).clamp(max=7).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def _bytes(words, reverse):
    b = cvt_rs.word_bytes(words).view(-1, 4)
    return (b.flip(-1) if reverse else b).flatten()


def model(rule, reverse=False):
    """A fake instruction: `rule(f, r) -> up` with byte k (or 3 - k) of the word for value k, after the feed."""
    def probe(v, words, f):
        v2, w2 = cvt_rs.apply_feed(v, words, f)
        lo, frac = _interval(v2)
        return _codes(v2, lo, rule(frac, _bytes(w2, reverse)))
    return probe


def contract(f, r):
    return r < ((torch.floor(f * 512).long() + 1) >> 1)


def truncating_add(f, r):  # r added below the kept bit, then truncated: up iff floor(256 f) + r >= 256
    return torch.floor(f * 256).long() + r >= 256


def truncating_compare(f, r):  # up iff r < floor(256 f)
    return r < torch.floor(f * 256).long()


def sixteen_bit_pairs(f, r):  # 16 random bits per value pair, used as one threshold for both
    r2 = r.view(-1, 2)
    t = (r2[:, 0] | (r2[:, 1] << 8)).repeat_interleave(2)
    return t < torch.floor(f * 65536).long()


@pytest.fixture(scope="module")
def table():
    v, words = cvt_rs.probe_table()
    return v, words, cvt_rs.expected_codes(v, words)


def test_probe_table_covers_every_bucket_with_every_byte(table):
    v, words, want = table
    assert v.numel() == 4 * words.numel()
    b = cvt_rs.word_bytes(words)
    assert torch.equal(b.view(-1, 256), torch.arange(256).expand(v.numel() // 256, 256))
    assert (b.view(-1, 4).unique(dim=1).shape[1] == 4)  # four different bytes per word
    lo, f = _interval(v)
    for sign in (1, -1):
        sel = (torch.sign(v) == sign) & (lo < 7)
        buckets = (lo[sel] * 512 + torch.floor(f[sel] * 512).long()).unique()
        assert buckets.numel() == 7 * 512  # every (interval, floor(512 f))
    # both ends of a bucket: f exactly b/512 and the largest float32 below (b+1)/512
    assert ((f * 512) == torch.floor(f * 512)).any() and ((f * 512) != torch.floor(f * 512)).any()
    assert (v.abs() > 6).any() and (v == 0).any() and (torch.signbit(v) & (v == 0)).any()


def test_expected_codes_are_the_contract(table):
    v, words, want = table
    assert torch.equal(want, round_sr(v, cvt_rs.word_bytes(words)))
    # the table has both outcomes in every interval (a rule that never or always rounds up fails it)
    lo, _ = _interval(v)
    assert ((want & 7).long() > lo).any() and ((want & 7).long() == lo).any()


def test_feed_words():
    assert cvt_rs.CANDIDATES[0] == cvt_rs.feed()  # the cheapest feed is tried first
    assert len(set(cvt_rs.CANDIDATES)) == 8 and all(f & cvt_rs.ON for f in cvt_rs.CANDIDATES)
    assert cvt_rs.feed(cvt_rs.REVERSED, True, True) == (0x0123 << 16) | 7
    words = torch.tensor([0x44332211, 0xFF00A0B0])
    _, w = cvt_rs.apply_feed(torch.zeros(8), words, cvt_rs.feed(cvt_rs.REVERSED))
    assert w.tolist() == [0x11223344, 0xB0A000FF]
    _, w = cvt_rs.apply_feed(torch.zeros(8), words, cvt_rs.feed(complement=True))
    assert w.tolist() == [0xBBCCDDEE, 0x00FF5F4F]


def test_bias_twin():
    """v + sign(v)·gap/512 toward zero: gap 1/2 below 2, 1 below 4, 2 above; truncation never rounds up."""
    v = torch.tensor([0.0, -0.0, 0.3, 1.999, 2.0, -3.5, 4.0, 5.99, 7.0, 1e-30], dtype=torch.float32)
    got, _ = cvt_rs.apply_feed(v, torch.zeros(3, dtype=torch.int64), cvt_rs.feed(bias=True))
    bias = torch.tensor([2**-10, -2**-10, 2**-10, 2**-10, 2**-9, -2**-9, 2**-8, 2**-8, 2**-8, 2**-10])
    exact = v.double() + bias.double()
    assert torch.all(got.double().abs() <= exact.abs())
    assert torch.all(exact.abs() - got.double().abs() < torch.finfo(torch.float32).eps * exact.abs())
    assert torch.signbit(got[1]) and got[1] == -2**-10
    # the value just below a bucket edge stays below it after the bias is truncated
    x = torch.nextafter(torch.tensor([1.5 + 0.5 * 3 / 512]), torch.tensor([0.0]))
    y, _ = cvt_rs.apply_feed(x, torch.zeros(1, dtype=torch.int64), cvt_rs.feed(bias=True))
    assert torch.floor((y - 1.5) / 0.5 * 256) == torch.floor(((x - 1.5) / 0.5 * 256) + 0.5)


@pytest.mark.parametrize("rule,reverse,want", [
    (contract, False, cvt_rs.feed()),
    (contract, True, cvt_rs.feed(cvt_rs.REVERSED)),
    (truncating_add, False, cvt_rs.feed(complement=True, bias=True)),
    (truncating_add, True, cvt_rs.feed(cvt_rs.REVERSED, complement=True, bias=True)),
    (truncating_compare, False, cvt_rs.feed(bias=True)),
])
def test_calibration_finds_the_feed(table, rule, reverse, want):
    f, why = cvt_rs.calibrate(model(rule, reverse))
    assert f == want, why
    v, words, expected = table
    assert torch.equal(model(rule, reverse)(v, words, f), expected)  # bit for bit on the whole table


def test_calibration_refuses_a_rule_no_feed_fixes():
    f, why = cvt_rs.calibrate(model(sixteen_bit_pairs))
    assert f == 0
    assert "does not reproduce" in why and "probe codes differ" in why


def test_calibration_detects_a_missing_instruction():
    f, why = cvt_rs.calibrate(lambda v, w, f: None)
    assert f == 0 and "sm_100a" in why


def test_unpack_probe_order():
    out = torch.tensor([0x4321, 0xF0E8], dtype=torch.int32)
    assert cvt_rs.unpack_probe(out).tolist() == [1, 2, 3, 4, 8, 14, 0, 15]


class _FakeExt:
    def __init__(self):
        self.feeds = {}

    def hw_sr_probe(self, *args):  # present: the attribute is what `ensure` looks for
        raise AssertionError("the probe goes through device_probe, patched here")

    def set_hw_sr_feed(self, device, f):
        self.feeds[device] = f


@pytest.fixture
def fake_device(monkeypatch):
    import megatron_mxfp4.ops.dispatch as dispatch

    cap = {"value": (10, 0)}
    monkeypatch.setattr(dispatch, "device_capability", lambda d: cap["value"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "a test GPU")
    monkeypatch.setattr(cvt_rs, "_state", {})
    monkeypatch.setattr(cvt_rs, "_deferred", set())
    table = cvt_rs.probe_table
    monkeypatch.setattr(cvt_rs, "probe_table", lambda device=None: table())  # the models run on the CPU
    return cap


def test_ensure_sets_the_feed_that_passes(monkeypatch, fake_device):
    ext = _FakeExt()
    monkeypatch.setattr(cvt_rs, "device_probe", lambda e, d: model(truncating_add))
    monkeypatch.setattr(cvt_rs, "_end_to_end", lambda e, d, f: None)
    dev = torch.device("cuda", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cvt_rs.ensure(ext, dev)
        cvt_rs.ensure(ext, dev)  # once per device
    want = cvt_rs.feed(complement=True, bias=True)
    assert ext.feeds == {3: want} and cvt_rs.feed_in_use(dev) == want and cvt_rs.tested(3)


def test_ensure_warns_once_and_keeps_the_software_rule(monkeypatch, fake_device):
    ext = _FakeExt()
    monkeypatch.setattr(cvt_rs, "device_probe", lambda e, d: model(sixteen_bit_pairs))
    dev = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="software rule .*does not reproduce"):
        cvt_rs.ensure(ext, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cvt_rs.ensure(ext, dev)
    assert ext.feeds == {} and cvt_rs.feed_in_use(dev) == 0 and cvt_rs.tested(0)


def test_ensure_needs_the_end_to_end_check(monkeypatch, fake_device):
    ext = _FakeExt()
    monkeypatch.setattr(cvt_rs, "device_probe", lambda e, d: model(contract))
    monkeypatch.setattr(cvt_rs, "_end_to_end", lambda e, d, f: "the quantize kernel differs on a test")
    with pytest.warns(RuntimeWarning, match="reproduces .* but the quantize kernel differs"):
        cvt_rs.ensure(ext, torch.device("cuda", 1))
    assert ext.feeds == {}


def test_ensure_skips_other_gpus_and_defers_under_capture(monkeypatch, fake_device):
    ext = _FakeExt()
    monkeypatch.setattr(cvt_rs, "device_probe", lambda e, d: pytest.fail("no probe on Hopper"))
    fake_device["value"] = (9, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cvt_rs.ensure(ext, torch.device("cuda", 0))
    assert cvt_rs.tested(0) and ext.feeds == {}
    fake_device["value"] = (10, 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.warns(RuntimeWarning, match="deferred"):
        cvt_rs.ensure(ext, torch.device("cuda", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cvt_rs.ensure(ext, torch.device("cuda", 1))  # warned once
    assert not cvt_rs.tested(1)
    monkeypatch.setattr(cvt_rs, "ENABLED", False)
    cvt_rs.ensure(ext, torch.device("cuda", 2))
    assert cvt_rs.tested(2) and ext.feeds == {}
