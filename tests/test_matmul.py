"""pq.matmul_4bit against dequantize-then-matmul in float64."""
import numpy as np
import pytest

import pyqlora as pq
from pyqlora import _dtypes

SHAPES = [  # (N, K, blocksize): K a multiple of 16 and of the blocksize, or not
    (64, 128, 64), (33, 4096, 64), (100, 96, 32), (17, 200, 64), (40, 70, 32), (1, 16, 32), (24, 4096, 4096)]


def reference(x, q, transpose):
    w = pq.dequantize(q).astype(np.float64)
    return x.astype(np.float64) @ (w.T if transpose else w)


def rel_err(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("n, k, blocksize", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 37])
@pytest.mark.parametrize("dtype", [np.float32, _dtypes.bfloat16])
@pytest.mark.parametrize("transpose", [True, False])
def test_matches_float64_reference(rng, n, k, blocksize, m, dtype, transpose):
    q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), blocksize=blocksize,
                    codebook=rng.choice(["nf4", "fp4"]), double_quant=bool(rng.integers(2)))
    x = rng.standard_normal((m, k if transpose else n)).astype(dtype)
    y = pq.matmul_4bit(x, q, transpose=transpose)
    assert y.dtype == np.dtype(dtype) and y.shape == (m, n if transpose else k)
    # float32 sums of `inner` products; bfloat16 output adds one rounding of 2^-9
    tol = 2e-6 * np.sqrt(k if transpose else n) + (8e-3 if dtype != np.float32 else 0)
    assert rel_err(y, reference(x, q, transpose)) < tol


def test_large_m_leading_dims_threads_and_out(rng):
    q = pq.quantize(rng.standard_normal((48, 256)).astype(np.float32))
    x = rng.standard_normal((4, 256, 256)).astype(np.float32)  # 1024 rows
    want = reference(x.reshape(-1, 256), q, True).reshape(4, 256, 48)
    for threads in (1, 2, 3):
        with pq.num_threads(threads):
            out = np.empty((4, 256, 48), np.float32)
            assert pq.matmul_4bit(x, q, out=out) is out
            assert rel_err(out, want) < 1e-5


def test_reference_kernel_agrees(rng):
    from pyqlora import _nf4core as E
    from pyqlora._codebooks import lookup_table

    q = pq.quantize(rng.standard_normal((96, 512)).astype(np.float32))
    x = rng.standard_normal((5, 512)).astype(np.float32)
    y_ref = np.empty((5, 96), np.float32)
    E.matmul_4bit(x.view(np.uint8).reshape(-1), 0, 5, 96, 512, q.packed, q.scales(), 64, lookup_table("nf4", 16),
                  True, y_ref.view(np.uint8).reshape(-1), True)
    assert rel_err(pq.matmul_4bit(x, q), y_ref.astype(np.float64)) < 1e-5
    assert rel_err(y_ref, reference(x, q, True)) < 1e-5


def test_bad_arguments(rng):
    q = pq.quantize(rng.standard_normal((8, 32)).astype(np.float32))
    with pytest.raises(ValueError, match="last dimension must be 32"):
        pq.matmul_4bit(np.ones((2, 8), np.float32), q)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        pq.matmul_4bit(np.ones((2, 32), np.float16), q)
    with pytest.raises(ValueError, match="2-D"):
        pq.matmul_4bit(np.ones((2, 32), np.float32), pq.quantize(np.ones(32, np.float32)))
    with pytest.raises(ValueError, match="out must be"):
        pq.matmul_4bit(np.ones((2, 32), np.float32), q, out=np.empty((2, 9), np.float32))
    with pytest.raises(TypeError, match="QuantizedArray"):
        pq.matmul_4bit(np.ones((2, 32), np.float32), np.ones((8, 32)))
