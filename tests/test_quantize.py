"""The array API: properties against independent oracles, dtypes, layouts, bad input."""
import math
import pickle

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pyqlora as pq
from pyqlora import _dtypes
from pyqlora import _nf4core as _ext

from oracle import nearest_codes, pack_nibbles, scaled_blocks, unpack_nibbles

CODEBOOKS = ["nf4", "fp4", "int4", "nf3", "nf2"]
finite = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=40), elements=finite)


def padded_table(name):
    t = pq.codebook(name)
    return np.concatenate([t, np.full(16 - t.size, t[-1], np.float32)]) if t.size < 16 else t


def max_gap(name):
    return float(np.max(np.diff(np.sort(pq.codebook(name)))))


# ------------------------------------------------------------ properties
@given(x=arrays, codebook=st.sampled_from(CODEBOOKS), blocksize=st.sampled_from([32, 64, 128]))
def test_codes_are_nearest_by_brute_force(x, codebook, blocksize):
    q = pq.quantize(x, codebook=codebook, blocksize=blocksize, double_quant=False)
    s, absmax = scaled_blocks(x, blocksize)
    expected = nearest_codes(padded_table(codebook), s)
    assert np.array_equal(q.absmax, absmax)
    assert np.array_equal(unpack_nibbles(q.packed, x.size), expected)
    assert np.array_equal(q.packed, pack_nibbles(expected, nearest_codes(padded_table(codebook), [0.0])[0]))


@given(x=arrays, codebook=st.sampled_from(CODEBOOKS), blocksize=st.sampled_from([32, 64, 256]))
def test_round_trip_error_bounded_by_half_the_largest_gap(x, codebook, blocksize):
    q = pq.quantize(x, codebook=codebook, blocksize=blocksize, double_quant=False)
    y = pq.dequantize(q).astype(np.float64).reshape(-1)
    scale = np.repeat(q.absmax.astype(np.float64), blocksize)[: x.size]
    err = np.abs(y - x.astype(np.float64).reshape(-1))
    # half the widest gap of the table, plus float32 rounding of the scaling
    assert np.all(err <= (0.5 * max_gap(codebook) + 1e-6) * scale + 1e-37)


@given(x=arrays, codebook=st.sampled_from(["nf4", "fp4", "int4"]), blocksize=st.sampled_from([32, 64]))
def test_quantize_dequantize_is_idempotent(x, codebook, blocksize):
    # The format scales a block by max(absmax, 1e-38) (bitsandbytes' clamp), so a
    # block whose absmax is a float32 subnormal below that does not map its
    # largest element to +-1, and the projection property does not hold there.
    _, absmax = scaled_blocks(x, blocksize)
    assume(np.all((absmax == 0) | (absmax >= np.float32(1e-38))))
    q = pq.quantize(x, codebook=codebook, blocksize=blocksize, double_quant=False)
    y = pq.dequantize(q)
    q2 = pq.quantize(y, codebook=codebook, blocksize=blocksize, double_quant=False)
    y2 = pq.dequantize(q2)
    # dequantize . quantize is a projection: values are unchanged the second time
    assert np.array_equal(y2, y)


@given(
    absmax=hnp.arrays(np.float32, st.integers(1, 1500), elements=st.floats(0, 1e4, width=32)),
)
def test_double_quant_error_bounded(absmax):
    # quantize a tensor whose blocks have exactly these scales: one element per block
    x = np.zeros((absmax.size, 32), np.float32)
    x[:, 0] = absmax
    q = pq.quantize(x, blocksize=32, double_quant=True)
    scales = q.scales().astype(np.float64)
    nested = np.repeat(q.nested_absmax.astype(np.float64), 256)[: absmax.size]
    # widest gap of the signed dynamic map is 1/64 of the nested scale (near +-1)
    bound = nested / 128 + 4 * np.spacing(np.float32(max(float(absmax.max()), 1e-30)))
    assert np.all(np.abs(scales - absmax) <= bound)
    assert q.nested_offset == pytest.approx(float(np.mean(absmax.astype(np.float64))), rel=1e-6, abs=1e-30)


@pytest.mark.parametrize("nblocks", [1, 255, 256 * 256, 256 * 256 + 1, 3 * 256 * 256 + 1000])
def test_double_quant_in_chunks_equals_one_pass(nblocks):
    """nf4_double_quantize quantizes the centred scales a chunk of 256 x 256 at a time through a small
    buffer: the bytes must be those of the correctly rounded mean and one 8-bit pass over all of them
    (pq.quantize_blockwise, blocksize 256, the dynamic map), across chunk edges and ragged ends."""
    from pyqlora._quantize import _double_quantize

    absmax = np.abs(np.random.default_rng(nblocks).standard_normal(nblocks)).astype(np.float32) * 3
    qabsmax, nested, offset = _double_quantize(absmax)
    mean = np.float32(np.sum(absmax, dtype=np.float64) / nblocks)  # correctly rounded (a float64 sum of these)
    assert np.float32(offset) == mean
    codes, scales = pq.quantize_blockwise(absmax - mean, blocksize=256, codebook="dynamic")
    assert np.array_equal(qabsmax, codes) and np.array_equal(nested, scales)


@given(x=arrays)
def test_8bit_codes_are_nearest(x):
    codes, absmax = pq.quantize_blockwise(x, blocksize=64)
    s, am = scaled_blocks(x, 64)
    assert np.array_equal(absmax, am)
    assert np.array_equal(codes.reshape(-1), nearest_codes(pq.dynamic_codebook(), s))
    y = pq.dequantize_blockwise(codes, absmax, blocksize=64)
    assert y.shape == x.shape
    assert np.array_equal(y.reshape(-1), pq.dynamic_codebook()[codes.reshape(-1)] * np.repeat(absmax, 64)[: x.size])


def test_reference_and_dispatched_kernels_agree(rng):
    # the optimized kernels slot in behind the dispatched entry points; both must
    # give the same bytes as the scalar reference for every dtype
    x = (rng.standard_normal(10_007) * 3).astype(np.float32)
    table = pq.codebook("nf4")
    for dt in (np.float32, np.float16, _dtypes.bfloat16):
        xd = x.astype(dt)
        outs = []
        for ref in (False, True):
            packed = np.empty(5004, np.uint8)
            absmax = np.empty(157, np.float32)
            _ext.quantize(4, xd.view(np.uint8), _dtypes.KERNEL_DTYPES[np.dtype(dt)], x.size, 64, table, packed,
                          absmax, ref)
            outs.append((packed.tobytes(), absmax.tobytes()))
        assert outs[0] == outs[1]


# ---------------------------------------------------------- dtypes, layout
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_dtypes_in_and_out(rng, dtype):
    x = rng.standard_normal((17, 33)).astype(_dtypes.normalize_dtype(dtype))
    q = pq.quantize(x)
    assert q.dtype == _dtypes.normalize_dtype(dtype)
    y = pq.dequantize(q)
    assert y.dtype == x.dtype and y.shape == x.shape
    # float64 is computed in float32: same codes as the float32 input
    if dtype == "float64":
        q32 = pq.quantize(x.astype(np.float32))
        assert np.array_equal(q.packed, q32.packed) and np.array_equal(q.absmax, q32.absmax)
    f32 = pq.dequantize(q, dtype=np.float32)
    for out_dtype in ["float16", "bfloat16", "float64"]:
        got = pq.dequantize(q, dtype=out_dtype)
        # each output dtype is the float32 result rounded once (nearest even)
        assert np.array_equal(got, f32.astype(_dtypes.normalize_dtype(out_dtype)))


def test_out_parameter(rng):
    x = rng.standard_normal((8, 100)).astype(np.float32)
    q = pq.quantize(x)
    out = np.empty((8, 100), np.float16)
    res = pq.dequantize(q, out=out)
    assert res is out and np.array_equal(out, pq.dequantize(q, dtype=np.float16))
    out64 = np.empty((8, 100), np.float64)
    assert pq.dequantize(q, out=out64) is out64
    assert np.array_equal(out64, pq.dequantize(q, dtype=np.float32).astype(np.float64))


def test_non_contiguous_read_only_and_lists(rng):
    base = rng.standard_normal((64, 130)).astype(np.float32)
    view = base[:, ::2]  # non-contiguous
    assert not view.flags.c_contiguous
    q = pq.quantize(view)
    assert np.array_equal(q.packed, pq.quantize(np.ascontiguousarray(view)).packed)
    ro = base.copy()
    ro.flags.writeable = False
    assert np.array_equal(pq.quantize(ro).packed, pq.quantize(base).packed)
    fortran = np.asfortranarray(base)
    assert np.array_equal(pq.quantize(fortran).packed, pq.quantize(base).packed)  # C order semantics
    assert pq.quantize([[0.5, -1.0], [0.25, 1.0]], double_quant=False).shape == (2, 2)
    big_endian = base.astype(">f4")
    assert np.array_equal(pq.quantize(big_endian).packed, pq.quantize(base).packed)


def test_scalar_and_one_element():
    q = pq.quantize(np.float32(3.0), double_quant=False)
    assert q.shape == () and pq.dequantize(q).shape == () and float(pq.dequantize(q)) == 3.0
    q1 = pq.quantize(np.array([-2.5], np.float32))
    assert float(pq.dequantize(q1)[0]) == pytest.approx(-2.5, rel=1e-2)


def test_all_zero_input_decodes_to_exact_zeros():
    for cb in ["nf4", "fp4", "int4"]:
        for dq in (False, True):
            q = pq.quantize(np.zeros((3, 100), np.float32), codebook=cb, double_quant=dq)
            y = pq.dequantize(q)
            assert np.all(y == 0)


def test_bits_per_param_and_nbytes():
    x = np.ones((512, 512), np.float32)
    plain = pq.quantize(x, double_quant=False)
    assert plain.bits_per_param == pytest.approx(4.5)
    assert plain.nbytes == 512 * 512 // 2 + 4 * 512 * 512 // 64
    dq = pq.quantize(x, double_quant=True)
    assert dq.nbytes == 512 * 512 // 2 + 512 * 512 // 64 + 4 * math.ceil(512 * 512 / 64 / 256) + 4
    for bs in pq.BLOCKSIZES:
        assert pq.quantize(x, blocksize=bs, double_quant=False).bits_per_param == pytest.approx(4 + 32 / bs)


def test_pickle_round_trip(rng):
    q = pq.quantize(rng.standard_normal(300).astype(np.float32))
    q2 = pickle.loads(pickle.dumps(q))
    assert np.array_equal(pq.dequantize(q2), pq.dequantize(q)) and repr(q2) == repr(q)


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_non_finite_input_names_the_index(bad, dtype):
    x = np.zeros((4, 70), _dtypes.normalize_dtype(dtype))
    x[2, 33] = bad
    with pytest.raises(pq.NonFiniteError, match=r"at index \(2, 33\)") as info:
        pq.quantize(x)
    assert info.value.index == (2, 33)
    assert math.isnan(info.value.value) if np.isnan(bad) else info.value.value == bad
    with pytest.raises(pq.NonFiniteError, match=r"index \(2, 33\)"):
        pq.quantize_blockwise(x)


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (np.arange(10), TypeError, "floating-point"),
        (np.ones(10, bool), TypeError, "floating-point"),
        (np.ones(10, np.complex64), TypeError, "floating-point"),
        (np.array(["a", "b"]), TypeError, "floating-point"),
        (np.array([1.0, None], dtype=object), TypeError, "floating-point"),
        (np.ones(4, np.longdouble), TypeError, "float32, float16"),
        (np.zeros((0, 5), np.float32), ValueError, "empty"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_arrays(x, exc, match):
    with pytest.raises(exc, match=match):
        pq.quantize(x)


@pytest.mark.parametrize("bs, exc", [(48, ValueError), (0, ValueError), (-64, ValueError), (8192, ValueError),
                                     (16, ValueError), (64.0, TypeError), (True, TypeError), ("64", TypeError)])
def test_bad_blocksize(bs, exc):
    with pytest.raises(exc, match="blocksize"):
        pq.quantize(np.ones(64, np.float32), blocksize=bs)
    with pytest.raises(exc, match="blocksize"):
        pq.quantize_blockwise(np.ones(64, np.float32), blocksize=bs)


def test_bad_codebook_and_flags():
    x = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="unknown 4-bit codebook"):
        pq.quantize(x, codebook="nf5x")
    with pytest.raises(ValueError, match="needs 5 bits"):
        pq.quantize(x, codebook="nf5")
    with pytest.raises(TypeError):
        pq.quantize(x, codebook=None)
    with pytest.raises(TypeError, match="double_quant"):
        pq.quantize(x, double_quant="yes")
    with pytest.raises(ValueError, match="8-bit codebook"):
        pq.quantize_blockwise(x, codebook="nf4")
    with pytest.raises(ValueError, match="256 values"):
        pq.quantize_blockwise(x, codebook=np.zeros(16))


def test_bad_dequantize_arguments(rng):
    q = pq.quantize(rng.standard_normal((4, 64)).astype(np.float32))
    with pytest.raises(TypeError, match="QuantizedArray"):
        pq.dequantize(np.zeros(4))
    with pytest.raises(TypeError, match="dtype"):
        pq.dequantize(q, dtype=np.int32)
    with pytest.raises(ValueError, match="shape"):
        pq.dequantize(q, out=np.empty((64, 4), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        pq.dequantize(q, dtype=np.float16, out=np.empty((4, 64), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        pq.dequantize(q, out=np.empty((64, 4), np.float32).T)
    ro = np.empty((4, 64), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pq.dequantize(q, out=ro)
    codes, absmax = pq.quantize_blockwise(np.ones(600, np.float32))
    with pytest.raises(ValueError, match="absmax has"):
        pq.dequantize_blockwise(codes, absmax[:-1])
    with pytest.raises(TypeError, match="uint8"):
        pq.dequantize_blockwise(codes.astype(np.int16), absmax)


def test_binding_rejects_short_buffers():
    # the thin Cython layer still refuses buffers that are too small
    with pytest.raises(ValueError, match="codes"):
        _ext.quantize(4, np.zeros(400, np.uint8), 0, 100, 64, pq.codebook("nf4"), np.zeros(10, np.uint8),
                      np.zeros(2, np.float32))


# -------------------------------------------------- corrupted checkpoints
@pytest.fixture
def good_dict(rng):
    q = pq.quantize(rng.standard_normal((32, 96)).astype(np.float32), codebook="nf4")
    return q.to_bnb_dict("w")


def _mutate(d, key, value):
    d = dict(d)
    if value is None:
        del d[key]
    else:
        d[key] = value
    return d


def _blob(meta):
    import json

    return np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()


META = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 96], "nested_blocksize": 256,
        "nested_dtype": "float32", "nested_offset": 0.5}
QS = "w.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("w", np.zeros(100, np.uint8), "truncated"),
        ("w", np.zeros(2000, np.uint8), "needs 1536"),
        ("w", None, "missing packed weight"),
        ("w.absmax", np.zeros(47, np.uint8), "absmax"),
        ("w.absmax", np.zeros(48, np.float32), "absmax must have dtype uint8"),
        ("w.absmax", None, "missing entry"),
        ("w.quant_map", np.zeros(16, np.float32), "quant_map"),
        ("w.quant_map", None, "missing entry"),
        ("w.nested_quant_map", np.zeros(256, np.float32), "dynamic map"),
        ("w.nested_absmax", np.array([np.nan], np.float32), "finite"),
        ("w.nested_absmax", np.zeros(3, np.float32), "nested_absmax"),
        (QS, np.frombuffer(b'{"quant_type": "nf4", "blo', np.uint8).copy(), "valid JSON"),
        (QS, np.frombuffer(b"\xff\xfe", np.uint8).copy(), "valid JSON"),
        (QS, np.frombuffer(b"[1, 2]", np.uint8).copy(), "JSON object"),
        (QS, _blob({**META, "shape": [32, 97]}), "absmax|packed|truncated|needs"),
        (QS, _blob({**META, "shape": "32x96"}), "shape"),
        (QS, _blob({**META, "shape": [32, -96]}), "non-negative"),
        (QS, _blob({**META, "quant_type": "fp4"}), "disagrees"),
        (QS, _blob({**META, "quant_type": "int8"}), "disagrees"),
        (QS, _blob({**META, "blocksize": 48}), "blocksize"),
        (QS, _blob({**META, "blocksize": "64"}), "integer"),
        (QS, _blob({**META, "dtype": "int8"}), "dtype"),
        (QS, _blob({**META, "nested_blocksize": 128}), "nested_blocksize"),
        (QS, _blob({**META, "nested_offset": "nan"}), "nested_offset"),
        (QS, _blob({k: v for k, v in META.items() if k != "dtype"}), "lacks 'dtype'"),
        (QS, np.zeros((2, 3), np.uint8), "1-D uint8"),
        (QS, None, "exactly one"),
    ],
)
def test_corrupted_bnb_dict_is_rejected(good_dict, key, value, match):
    with pytest.raises(ValueError, match=match):
        pq.QuantizedArray.from_bnb_dict(_mutate(good_dict, key, value), prefix="w")


def test_unknown_quant_type_key_and_extra_entries(good_dict):
    d = dict(good_dict)
    d["w.quant_state.bitsandbytes__int4"] = d.pop(QS)
    with pytest.raises(ValueError, match="exactly one"):
        pq.QuantizedArray.from_bnb_dict(d, prefix="w")
    with pytest.raises(ValueError, match="exactly one"):
        pq.QuantizedArray.from_bnb_dict({**good_dict, "w.quant_state.bitsandbytes__fp4": good_dict[QS]}, "w")
    with pytest.raises(ValueError, match="unexpected"):
        pq.QuantizedArray.from_bnb_dict({**good_dict, "w.rogue": np.zeros(1)}, "w")
    # unrelated keys elsewhere in a state dict are fine
    q = pq.QuantizedArray.from_bnb_dict({**good_dict, "bias": np.zeros(3), "w2.absmax": np.zeros(1)}, "w")
    assert q.shape == (32, 96)


def test_non_dq_dict_with_nested_fields_is_rejected(rng):
    d = pq.quantize(rng.standard_normal(128).astype(np.float32), double_quant=False).to_bnb_dict("w")
    meta = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [128], "nested_offset": 0.1}
    d[QS] = _blob(meta)
    with pytest.raises(ValueError, match="nested"):
        pq.QuantizedArray.from_bnb_dict(d, "w")


def test_to_bnb_dict_refuses_non_bnb_codebooks():
    with pytest.raises(ValueError, match="only nf4 and fp4"):
        pq.quantize(np.ones(64, np.float32), codebook="int4").to_bnb_dict()


@pytest.mark.slow
def test_more_than_two_to_the_31_elements():
    """64-bit indexing end to end: 2^31 + 100 elements, checked around 2^31.

    The input is a lazily zero-filled float16 buffer (untouched pages cost no
    memory); a few blocks hold data, at the start, across the 2^31 boundary
    and at the end. About 5 GiB are touched.
    """
    n = 2**31 + 100
    x = np.zeros(n, np.float16)
    spots = [0, 2**31 - 69, 2**31 - 3, 2**31 + 37, n - 1]  # one per block
    for i, s in enumerate(spots):
        x[s] = np.float16(i + 1.5)
    q = pq.quantize(x, blocksize=64, double_quant=False)
    assert q.packed.size == (n + 1) // 2 and q.absmax.size == -(-n // 64)
    for i, s in enumerate(spots):
        assert q.absmax[s // 64] == np.float32(i + 1.5)
    del x
    y = pq.dequantize(q, dtype=np.float16)
    for i, s in enumerate(spots):
        assert y[s] == np.float16(i + 1.5)
        assert y[s - 1] == 0 if s % 64 else True
    assert np.count_nonzero(y[2**31 - 128 :]) == 4  # zeros decode to zeros around the spots


# -- issue 18: no call that raises may change state; bad arguments get clear errors ---------------
def _fields(q, **change):
    kw = dict(shape=q.shape, dtype=q.dtype, codebook=q.codebook, blocksize=q.blocksize, packed=q.packed,
              absmax=q.absmax, nested_absmax=q.nested_absmax, nested_offset=q.nested_offset)
    kw.update(change)
    return kw


@pytest.mark.parametrize("change, exc, match", [
    ({"blocksize": 0}, ValueError, "blocksize"),
    ({"blocksize": 64.0}, TypeError, "blocksize"),
    ({"codebook": None}, TypeError, "codebook"),
    ({"codebook": "xx"}, ValueError, "codebook"),
    ({"codebook": 5}, TypeError, "codebook"),
    ({"shape": (-32, -96)}, ValueError, "negative"),
    ({"shape": (32.0, 96)}, TypeError, "integers"),
    ({"shape": 3072}, TypeError, "sequence"),
    ({"dtype": "int32"}, TypeError, "dtype"),
    ({"nested_offset": float("nan")}, ValueError, "nested_offset"),
])
def test_quantized_array_rejects_bad_fields_at_construction(rng, change, exc, match):
    q = pq.quantize(rng.standard_normal((32, 96)).astype(np.float32))
    with pytest.raises(exc, match=match):
        pq.QuantizedArray(**_fields(q, **change))


def test_quantized_array_rejects_non_contiguous_buffers_and_stray_offset(rng):
    q = pq.quantize(rng.standard_normal(256).astype(np.float32), double_quant=False)
    with pytest.raises(ValueError, match="packed must be contiguous"):
        pq.QuantizedArray(**_fields(q, packed=np.repeat(q.packed, 2)[::2]))
    with pytest.raises(ValueError, match="nested_offset"):
        pq.QuantizedArray(**_fields(q, nested_offset=0.5))


def test_unpickling_checks_the_state_like_the_constructor(rng):
    q = pq.quantize(rng.standard_normal((32, 96)).astype(np.float32))
    state = q.__getstate__()
    state["blocksize"] = 128  # an edited pickle would dequantize to wrong values
    with pytest.raises(ValueError, match="absmax"):
        pickle.loads(pickle.dumps(q)).__setstate__(state)
    with pytest.raises(ValueError, match="state of a QuantizedArray"):
        pickle.loads(pickle.dumps(q)).__setstate__({"shape": (2,)})


def test_dequantize_out_of_a_non_float_dtype_is_a_type_error(rng):
    q = pq.quantize(rng.standard_normal((8, 64)).astype(np.float32))
    with pytest.raises(TypeError, match="out dtype"):
        pq.dequantize(q, out=np.empty((8, 64), np.int32))


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_into_memory_that_overlaps_the_codes(rng, double_quant):
    """out= may overlap the quantized arrays (np semantics): the result is as if it did not."""
    w = rng.standard_normal((64, 64)).astype(np.float32)
    q = pq.quantize(w, double_quant=double_quant)
    buf = np.zeros(w.nbytes + 64, np.uint8)
    packed = buf[:q.packed.nbytes]
    packed[:] = q.packed  # the codes live at the start of the buffer out= will cover
    q2 = pq.QuantizedArray(**_fields(q, packed=packed))
    ref = pq.dequantize(q)
    out = buf[:w.nbytes].view(np.float32).reshape(w.shape)
    assert pq.dequantize(q2, out=out) is out
    np.testing.assert_array_equal(out, ref)
    codes = np.arange(256, dtype=np.uint8)
    absmax = np.array([2.0], np.float32)
    ref8 = pq.dequantize_blockwise(codes, absmax)
    raw = np.zeros(1024, np.uint8)
    raw[:256] = codes
    out8 = raw.view(np.float32)[:256]
    pq.dequantize_blockwise(raw[:256], absmax, out=out8)
    np.testing.assert_array_equal(out8, ref8)


def test_the_c_kernel_refuses_out_over_its_inputs():
    """Under the copy through a temporary above, nf4core itself rejects out overlapping the codes or
    the scales (common.h: no output may overlap an input) and writes nothing."""
    codes = np.arange(256, dtype=np.uint8)
    absmax = np.array([2.0], np.float32)
    table = pq.dynamic_codebook(signed=True)
    raw = np.zeros(1024, np.uint8)
    raw[:256] = codes
    with pytest.raises(ValueError, match="output 'out' overlaps input 'codes'"):
        _ext.dequantize(8, raw[:256], absmax, 256, 256, table, raw, 0)
    np.testing.assert_array_equal(raw[:256], codes)
    assert not raw[256:].any()
    buf = np.zeros(2048, np.uint8)
    scales = buf[:4].view(np.float32)
    scales[0] = 2.0
    with pytest.raises(ValueError, match="output 'out' overlaps input 'absmax'"):
        _ext.dequantize(8, codes, scales, 256, 256, table, buf, 0)
    with pytest.raises(ValueError, match="output 'codes' overlaps input 'x'"):
        x = np.ones(256, np.float32)
        _ext.quantize(8, x.view(np.uint8), 0, 256, 256, table, x.view(np.uint8)[:256], absmax)


_BNB_KEYS = ["w", "w.absmax", "w.quant_map", "w.nested_absmax", "w.nested_quant_map", QS]
_junk = st.one_of(
    st.none(),
    st.binary(max_size=64).map(lambda b: np.frombuffer(b, np.uint8).copy()),
    st.sampled_from([np.zeros(0, np.float32), np.zeros((2, 2), np.uint8), np.array([np.nan], np.float32),
                     np.zeros(48, np.float32), np.zeros(48, np.float64), np.zeros(1536, np.int16), "text", 3.5]),
)


@given(key=st.sampled_from(_BNB_KEYS), value=_junk, meta=st.dictionaries(
    st.sampled_from(sorted(META)), st.one_of(st.none(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=4),
                                             st.lists(st.integers(-3, 100), max_size=3)), max_size=3))
def test_corrupted_bnb_dicts_fail_cleanly(key, value, meta):
    """Property: from_bnb_dict of a damaged dictionary succeeds or raises ValueError/TypeError, nothing else;
    what it accepts dequantizes."""
    q = pq.quantize(np.linspace(-1, 1, 32 * 96, dtype=np.float32).reshape(32, 96))
    d = q.to_bnb_dict("w")
    if meta:
        d[QS] = _blob({**META, **meta})
    d = _mutate(d, key, value) if value is not None or key in d else d
    try:
        got = pq.QuantizedArray.from_bnb_dict(d, prefix="w")
    except (ValueError, TypeError):
        return
    assert pq.dequantize(got).shape == got.shape
