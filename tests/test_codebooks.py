"""Codebooks against bitsandbytes' tables and an independent SciPy derivation."""
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st

import bitsandbytes.functional as bnbF
import pyqlora as pq
from pyqlora import _nf4core as _cb


def test_nf4_is_bitsandbytes_table_exactly():
    assert np.array_equal(pq.codebook("nf4"), bnbF.get_4bit_type("nf4", device="cpu").numpy())


def test_fp4_matches_bitsandbytes():
    ours = pq.codebook("fp4")
    theirs = bnbF.get_4bit_type("fp4", device="cpu").numpy()
    assert ours.dtype == np.float32
    assert np.array_equal(ours, theirs)
    # code 8 is -0.0, as bitsandbytes' kernels decode it (lut[c & 7] * -1); its
    # Python table holds +0.0 there, which QuantizedArray.to_bnb_dict writes
    assert np.signbit(ours[8]) and not np.signbit(theirs[8])


def test_int4_closed_form():
    # bitsandbytes lists int4 as [7..0, -0..-7] / 7 but its get_4bit_type("int4")
    # raises in 0.50.2 (in-place float division of an int64 tensor), so the
    # oracle is the closed form: sign-magnitude, code 8 is -0 (as in FP4).
    expected = np.array([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7], np.float32) / np.float32(7)
    assert pq.codebook("int4").tobytes() == expected.tobytes()


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    assert np.array_equal(pq.dynamic_codebook(signed), bnbF.create_dynamic_map(signed=signed).numpy())


def test_nf4_is_create_normal_map():
    # bitsandbytes' generator itself (needs SciPy), not just its hard-coded table
    m = bnbF.create_normal_map(offset=0.9677083, use_extra_value=True).numpy()
    assert np.array_equal(pq.codebook("nf4"), np.concatenate([m[:8], m[-8:]]))


def _scipy_normal_map_f32(k, offset):
    """create_normal_map generalized to k bits, evaluated as bitsandbytes does
    (float32 torch.linspace, SciPy norm.ppf, float32 normalization)."""
    half = 2 ** (k - 1)
    v1 = scipy.stats.norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1]).tolist()
    v3 = (-scipy.stats.norm.ppf(torch.linspace(offset, 0.5, half)[:-1])).tolist()
    v = torch.tensor(v1 + [0.0] + v3, dtype=torch.float32).sort().values
    return (v / v.max()).numpy()


def _scipy_normal_map_f64(k, offset):
    """The same construction entirely in float64 (no float32 emulation)."""
    half = 2 ** (k - 1)
    v1 = scipy.stats.norm.ppf(np.linspace(offset, 0.5, half + 1)[:-1])
    v3 = -scipy.stats.norm.ppf(np.linspace(offset, 0.5, half)[:-1])
    v = np.sort(np.concatenate([v1, [0.0], v3]))
    return v / v.max()


@pytest.mark.parametrize("k", range(2, 9))
def test_nfk_equals_independent_scipy_derivation(k):
    offset = _cb.normal_offset(k)
    ours = pq.codebook(f"nf{k}")
    assert ours.shape == (2**k,)
    np.testing.assert_array_equal(ours, _scipy_normal_map_f32(k, offset))
    # and close to the construction done wholly in float64: the float32 linspace
    # moves each quantile point by up to half an ulp (3e-8), which the ppf's
    # slope in the tails (up to ~40 for nf8) turns into about 1e-6
    np.testing.assert_allclose(ours, _scipy_normal_map_f64(k, offset), rtol=0, atol=2e-6)


def test_offset_rule_reproduces_paper_constant():
    assert _cb.normal_offset(4) == 0.9677083
    exact = [1 - (1 / (2 * (2**k - 1)) + 1 / (2 * 2**k)) / 2 for k in range(2, 9)]
    assert [_cb.normal_offset(k) for k in range(2, 9)] == [round(e, 7) for e in exact]


@given(st.integers(min_value=2, max_value=8))
def test_nfk_structure(k):
    t = pq.codebook(f"nf{k}")
    assert t[0] == -1.0 and t[-1] == 1.0
    assert np.all(np.diff(t) > 0)  # sorted and distinct
    assert np.count_nonzero(t == 0) == 1 and not np.signbit(t[t == 0][0])
    assert np.count_nonzero(t > 0) == 2 ** (k - 1)


@given(st.floats(min_value=1e-12, max_value=1 - 1e-12))
def test_norm_ppf_matches_scipy(p):
    assert _cb.norm_ppf(p) == pytest.approx(scipy.stats.norm.ppf(p), rel=1e-13, abs=1e-14)


def test_codebook_returns_fresh_copies():
    t = pq.codebook("nf4")
    t[:] = 0
    assert pq.codebook("nf4")[0] == -1.0


@pytest.mark.parametrize("bad", ["nf9", "nf1", "af4", "", "NF44"])
def test_unknown_codebook(bad):
    with pytest.raises(ValueError, match="unknown codebook"):
        pq.codebook(bad)


def test_codebook_name_type():
    with pytest.raises(TypeError):
        pq.codebook(4)
