"""Compatibility with bitsandbytes 0.50.2 (CPU), the format pyqlora matches.

bitsandbytes on CPU quantizes 4-bit with its pure-torch default backend and
dequantizes with C++ kernels; its 8-bit quantize_blockwise (also used for the
double-quantized scales) runs a C++ kernel that finds codes through a
65,536-bin lookup table, which picks the second-nearest code for inputs very
close to a midpoint. pyqlora always picks the nearest code, which is what
bitsandbytes' reference backend (`default`, used here through the dispatcher)
and its CUDA kernels compute. The tests below assert byte equality with the
reference backend and, against the CPU kernel, that every difference is such a
near-midpoint case where pyqlora's code is the nearest one.
"""
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pyqlora as pq
from pyqlora import _dtypes

from oracle import nearest_codes

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = ["float32", "float16", "bfloat16"]
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_torch(x):
    x = np.ascontiguousarray(x)
    if x.dtype == _dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def to_numpy(t):
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_dtypes.bfloat16)
    return t.numpy()


def bits(a):
    """Raw bytes of an array, so that equality is bit equality (NaN, -0)."""
    return np.ascontiguousarray(a).tobytes()


def value_bits(a):
    """Bytes of dequantized values with -0.0 read as +0.0.

    bitsandbytes itself is not consistent about the sign of FP4's code 8 on
    CPU: its scalar kernel decodes it as -0.0, its AVX-512 kernel (used when
    the size is a multiple of 16) as +0.0. pyqlora always gives -0.0.
    """
    a = np.ascontiguousarray(a).copy()
    a[a == 0] = 0
    return a.tobytes()


def _reference(op, *args):
    """Run bitsandbytes' reference (`default`, pure torch) backend of an op on CPU
    tensors: it is registered as CompositeExplicitAutograd, which the XPU key
    resolves to (no XPU kernel is installed)."""
    kernel = torch.library.get_kernel(op, "XPU")
    return kernel.call_boxed(torch._C.DispatchKeySet(torch._C.DispatchKey.XPU), *args)


def reference_quantize_blockwise(x, code, blocksize):
    return _reference(torch.ops.bitsandbytes.quantize_blockwise.default, x, code, blocksize)


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit through its reference backend.

    bitsandbytes 0.50.2's CPU C++ kernel decodes with the wrong block scale when
    a block spans rows (blocksize > last dimension, e.g. a 128x64 weight with
    blocksize 128); see docs/format.md. Its reference backend, the format's
    definition, is what pyqlora matches; test_cpu_kernel_agrees_when_rows_are_whole_blocks
    covers the CPU kernel where it is right.
    """
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return to_numpy(_reference(torch.ops.bitsandbytes.dequantize_4bit.default, packed, absmax.float(),
                               state.blocksize, state.quant_type, list(state.shape), state.dtype))


def sample(rng, shape, dtype, kind="normal"):
    if kind == "normal":
        x = rng.standard_normal(shape) * rng.choice([1e-3, 0.02, 1.0, 50.0])
    else:  # heavy tails and exact zeros
        x = np.clip(rng.standard_cauchy(shape), -6e4, 6e4)  # finite in float16
        x[rng.random(shape) < 0.05] = 0.0
    return x.astype(_dtypes.normalize_dtype(dtype))


SHAPES = [(1,), (2,), (7,), (33, 70), (3, 1000), (128, 64)]


# ---------------------------------------------------------------- 4-bit bytes
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_4bit_bytes_absmax_and_values_match(rng, quant_type, blocksize, dtype):
    for shape in SHAPES + [(blocksize * 2 + 5,)]:
        for kind in ("normal", "cauchy"):
            x = sample(rng, shape, dtype, kind)
            packed, state = F.quantize_4bit(to_torch(x), blocksize=blocksize, quant_type=quant_type)
            q = pq.quantize(x, codebook=quant_type, blocksize=blocksize, double_quant=False)
            assert bits(q.packed) == bits(packed.numpy().reshape(-1)), (shape, kind)
            assert bits(q.absmax) == bits(state.absmax.numpy()), (shape, kind)
            theirs = bnb_dequantize(packed, state)
            ours = pq.dequantize(q)
            assert ours.dtype == theirs.dtype and ours.shape == x.shape
            assert value_bits(ours) == value_bits(theirs), (shape, kind)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_edge_values_match(quant_type):
    """Zero blocks, exact midpoints, values near +-0, subnormals, huge values."""
    table = pq.codebook(quant_type)
    srt = np.sort(table)
    mids = ((srt[:-1] + srt[1:]) / np.float32(2)).astype(np.float32)
    blocks = [
        np.zeros(64, np.float32),
        np.concatenate([[1.0], mids, -mids, np.nextafter(mids, 2), np.nextafter(mids, -2)]).astype(np.float32),
        np.concatenate([[1.0], np.linspace(-0.01, 0.01, 63)]).astype(np.float32),
        np.full(64, -0.0, np.float32),
        np.linspace(-1e-40, 1e-40, 64).astype(np.float32),  # subnormal absmax
        np.linspace(-3e38, 3e38, 64).astype(np.float32),
    ]
    x = np.concatenate([np.resize(b, 64) for b in blocks] + [np.array([0.5, 0.0, -0.25], np.float32)])
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=quant_type)
    q = pq.quantize(x, codebook=quant_type, blocksize=64, double_quant=False)
    assert bits(q.packed) == bits(packed.numpy().reshape(-1))
    assert bits(q.absmax) == bits(state.absmax.numpy())
    assert value_bits(pq.dequantize(q)) == value_bits(bnb_dequantize(packed, state))
    assert np.all(pq.dequantize(q)[:64] == 0)


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@given(
    x=hnp.arrays(np.float32, st.integers(1, 700), elements=st.one_of(finite_f32, st.sampled_from([0.0, -0.0, 1.0]))),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    blocksize=st.sampled_from([32, 64, 256]),
)
def test_4bit_matches_on_arbitrary_inputs(x, quant_type, blocksize):
    packed, state = F.quantize_4bit(torch.from_numpy(x.copy()), blocksize=blocksize, quant_type=quant_type)
    q = pq.quantize(x, codebook=quant_type, blocksize=blocksize, double_quant=False)
    assert bits(q.packed) == bits(packed.numpy().reshape(-1))
    assert bits(q.absmax) == bits(state.absmax.numpy())
    assert value_bits(pq.dequantize(q)) == value_bits(bnb_dequantize(packed, state))


# ------------------------------------------------------------------- 8-bit
def _check_against_cpu_lut(x_f32, ours, theirs, absmax, blocksize, table):
    """Codes differ from bitsandbytes' CPU kernel only where its LUT misses the nearest code."""
    diff = np.flatnonzero(ours != theirs)
    # each difference is checked below; the count is only a sanity bound (bfloat16
    # inputs make near-midpoint scales common)
    assert diff.size <= max(8, 0.05 * ours.size), f"{diff.size} of {ours.size} codes differ"
    if diff.size == 0:
        return
    n = x_f32.size
    for i in diff:
        b = i // blocksize
        tail = (b + 1) * blocksize > n
        am = max(absmax[b], np.float32(1e-38))
        s = np.float32(x_f32[i] / am) if tail else np.float32(x_f32[i] * (np.float32(1) / am))
        s = np.clip(s, -1, 1)
        assert ours[i] == nearest_codes(table, [s])[0]  # ours is the nearest code
        # the LUT's bins are 2/65535 wide, so its code is at most one bin worse
        assert abs(s - table[theirs[i]]) - abs(s - table[ours[i]]) <= 2.0 / 65535, "not explained by the LUT"


@pytest.mark.parametrize("blocksize", [64, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_8bit_blockwise_matches_reference_backend(rng, blocksize, dtype):
    code = F.create_dynamic_map(signed=True)
    for shape in [(1,), (5,), (blocksize * 3 + 17,), (40, 129)]:
        x = sample(rng, shape, dtype)
        ours, absmax = pq.quantize_blockwise(x, blocksize=blocksize)
        ref_codes, ref_absmax = reference_quantize_blockwise(to_torch(x), code, blocksize)
        assert bits(ours) == bits(ref_codes.numpy()), shape
        assert bits(absmax) == bits(ref_absmax.numpy()), shape
        # bitsandbytes' CPU kernel: same scales; codes equal up to its LUT misses
        cpu_codes, cpu_state = F.quantize_blockwise(to_torch(x), code=code.clone(), blocksize=blocksize)
        assert bits(absmax) == bits(cpu_state.absmax.numpy())
        _check_against_cpu_lut(
            x.astype(np.float32).reshape(-1), ours.reshape(-1), cpu_codes.numpy().reshape(-1), absmax, blocksize,
            code.numpy(),
        )
        # dequantize (C++ on the bitsandbytes side) is bit-identical, for every output dtype
        for out_dtype in DTYPES:
            theirs = F.dequantize_blockwise(ref_codes, absmax=torch.from_numpy(absmax), code=code,
                                            blocksize=blocksize)
            theirs = to_numpy(theirs.to(TORCH_DTYPES[out_dtype]) if out_dtype != "float32" else theirs)
            mine = pq.dequantize_blockwise(ours, absmax, blocksize=blocksize, dtype=out_dtype)
            assert bits(mine) == bits(theirs)


@given(
    x=hnp.arrays(np.float32, st.integers(1, 900), elements=finite_f32),
    blocksize=st.sampled_from([64, 256]),
    signed=st.booleans(),
)
def test_8bit_matches_reference_on_arbitrary_inputs(x, blocksize, signed):
    code = F.create_dynamic_map(signed=signed)
    if not signed:
        x = np.abs(x)
    ours, absmax = pq.quantize_blockwise(x, blocksize=blocksize, codebook="dynamic" if signed else "dynamic_unsigned")
    ref_codes, ref_absmax = reference_quantize_blockwise(torch.from_numpy(x.copy()), code, blocksize)
    assert bits(ours) == bits(ref_codes.numpy())
    assert bits(absmax) == bits(ref_absmax.numpy())


# ------------------------------------------------------ double quantization
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quantization_matches(rng, quant_type, blocksize, dtype):
    x = sample(rng, (96, 1000), dtype)
    packed, state = F.quantize_4bit(to_torch(x), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=True)
    q = pq.quantize(x, codebook=quant_type, blocksize=blocksize, double_quant=True)
    plain = pq.quantize(x, codebook=quant_type, blocksize=blocksize, double_quant=False)
    assert bits(q.packed) == bits(packed.numpy().reshape(-1))
    # offset = mean(absmax): ours is the correctly rounded mean; torch's float32 cascade sum of the
    # n block scales may be off by about log2(n) roundings (3 ulps seen for n = 375)
    n = q.absmax.size
    assert abs(q.nested_offset - state.offset.item()) <= np.ceil(np.log2(n)) * np.spacing(np.float32(q.nested_offset))
    # exact: the reference backend applied to (absmax - our offset)
    centered = torch.from_numpy(plain.absmax - np.float32(q.nested_offset))
    ref_codes, ref_nested = reference_quantize_blockwise(centered, F.create_dynamic_map(signed=True), 256)
    assert bits(q.absmax) == bits(ref_codes.numpy())
    assert bits(q.nested_absmax) == bits(ref_nested.numpy())
    # against bitsandbytes' CPU result: nested scales agree to float rounding,
    # codes up to the LUT misses
    np.testing.assert_allclose(q.nested_absmax, state.state2.absmax.numpy(), rtol=1e-6)
    _check_against_cpu_lut(
        centered.numpy(), q.absmax, state.absmax.numpy(), q.nested_absmax, 256, F.create_dynamic_map().numpy()
    )
    # the scales bitsandbytes would decode from our bytes are ours, bit for bit
    ours_scales = q.scales()
    theirs_scales = (F.dequantize_blockwise(torch.from_numpy(q.absmax), absmax=torch.from_numpy(q.nested_absmax),
                                            code=F.create_dynamic_map(), blocksize=256)
                     + torch.tensor(q.nested_offset, dtype=torch.float32)).numpy()
    assert bits(ours_scales) == bits(theirs_scales)
    # DQ error is bounded: half the widest code gap (1/64 near +-1, 1/128 of the range) times the nested scale
    err = np.abs(ours_scales - plain.absmax)
    bound = 0.5 * (1.0 / 64) * np.repeat(q.nested_absmax, 256)[: err.size] + 1e-6 * plain.absmax.max()
    assert np.all(err <= bound)


def test_double_quant_bits_per_param():
    q = pq.quantize(np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32))
    # 4 + 8/64 + 32/(64*256) + 32 bits of offset over 2^20 params
    assert q.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 2**20)
    assert round(q.bits_per_param, 3) == 4.127


# ---------------------------------------------------- checkpoint dictionaries
def bnb_dict(packed, state, prefix="weight"):
    d = {prefix: packed}
    d.update({f"{prefix}.{k}": v for k, v in state.as_dict(packed=True).items()})
    return d


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bnb_dict_loads_in_pyqlora_and_round_trips_byte_for_byte(rng, quant_type, double_quant, dtype):
    x = sample(rng, (48, 200), dtype)
    packed, state = F.quantize_4bit(to_torch(x), blocksize=64, quant_type=quant_type,
                                    compress_statistics=double_quant)
    theirs = bnb_dict(packed, state, "model.layers.0.mlp.up_proj.weight")
    q = pq.QuantizedArray.from_bnb_dict(theirs, prefix="model.layers.0.mlp.up_proj.weight")
    assert q.shape == (48, 200) and q.dtype == _dtypes.normalize_dtype(dtype) and q.double_quant == double_quant
    assert value_bits(pq.dequantize(q)) == value_bits(bnb_dequantize(packed, state))
    again = q.to_bnb_dict("model.layers.0.mlp.up_proj.weight")
    assert list(again) == list(theirs)  # same keys in the same order
    for k, v in theirs.items():
        assert again[k].dtype == v.numpy().dtype, k
        assert again[k].shape == tuple(v.shape), k
        assert bits(again[k]) == bits(v.numpy()), k  # JSON blob included


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_pyqlora_dict_loads_in_bitsandbytes(rng, quant_type, double_quant):
    x = sample(rng, (64, 96), "bfloat16")
    q = pq.quantize(x, codebook=quant_type, blocksize=64, double_quant=double_quant)
    d = {k: torch.from_numpy(v) for k, v in q.to_bnb_dict("weight").items()}
    qs = {k[len("weight."):]: v for k, v in d.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(data=d["weight"], quantized_stats=qs, device="cpu")
    assert p.quant_state.shape == torch.Size([64, 96]) and p.quant_state.dtype == torch.bfloat16
    assert p.quant_state.nested == double_quant
    assert value_bits(bnb_dequantize(p.data, p.quant_state)) == value_bits(pq.dequantize(q))
    blob = json.loads(bytes(q.to_bnb_dict()[f"weight.quant_state.bitsandbytes__{quant_type}"]))
    assert blob["shape"] == [64, 96] and blob["dtype"] == "bfloat16" and blob["blocksize"] == 64


def test_non_dq_json_bytes_equal_bitsandbytes(rng):
    x = sample(rng, (16, 130), "float16")
    packed, state = F.quantize_4bit(to_torch(x), blocksize=128, quant_type="fp4", compress_statistics=False)
    q = pq.quantize(x, codebook="fp4", blocksize=128, double_quant=False)
    theirs = bnb_dict(packed, state)
    ours = q.to_bnb_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert bits(ours[k]) == bits(theirs[k].numpy()), k


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_linear4bit_state_dict_loads(storage):
    """The transformers path: a real bnb.nn.Linear4bit quantized on CPU, any quant_storage."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 64)
    layer = bnb.nn.Linear4bit(256, 64, quant_type="nf4", compress_statistics=True, quant_storage=storage)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    sd = layer.state_dict()
    q = pq.QuantizedArray.from_bnb_dict(sd, prefix="weight")
    assert q.shape == (64, 256) and q.codebook == "nf4" and q.double_quant
    theirs = bnb_dequantize(layer.weight.data, layer.weight.quant_state)
    assert bits(pq.dequantize(q)) == bits(theirs)
    # and it equals quantizing the same weights with pyqlora
    mine = pq.quantize(dense.weight.detach().numpy(), codebook="nf4", blocksize=64)
    assert bits(mine.packed) == bits(q.packed)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_cpu_kernel_agrees_when_rows_are_whole_blocks(rng, quant_type, dtype, double_quant):
    """bitsandbytes' C++ CPU dequantize kernel, on shapes whose rows are whole blocks."""
    for shape, blocksize in [((64, 256), 64), ((32, 512), 128), ((8, 4096), 4096), ((4, 96), 32)]:
        x = sample(rng, shape, dtype)
        packed, state = F.quantize_4bit(to_torch(x), blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        q = pq.QuantizedArray.from_bnb_dict(bnb_dict(packed, state))
        assert value_bits(pq.dequantize(q)) == value_bits(to_numpy(F.dequantize_4bit(packed, state)))
