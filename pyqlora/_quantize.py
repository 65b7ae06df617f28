"""The array API: quantize / dequantize (4-bit) and blockwise 8-bit.

Python validates and normalizes (dtype, contiguity, shape, arguments) and
allocates outputs; the Cython bindings (``bindings/quantize.pxi``) call nf4core
with the GIL released.
"""
import numpy as np

from . import _cuda, _dtypes
from . import _nf4core as _ext  # bindings/quantize.pxi
from ._array import QuantizedArray, block_scales
from ._codebooks import lookup_table
from ._errors import NonFiniteError
from ._formats import DQ_BLOCKSIZE, check_blocksize, check_codebook
from ._runtime import sync_threads

__all__ = ["quantize", "dequantize", "quantize_blockwise", "dequantize_blockwise"]


def _as_input(x, what="x"):
    """C-contiguous native-endian array of a kernel dtype, plus the caller's dtype.

    float64 input is converted to float32 (the kernels compute in float32).
    Read-only and non-contiguous arrays are accepted (the latter are copied);
    CPU torch tensors are read in place (:func:`pyqlora._dtypes.as_numpy`).
    """
    arr = _dtypes.as_numpy(x)
    if arr.dtype.kind != "f" and arr.dtype != _dtypes.bfloat16:
        raise TypeError(
            f"{what} must be a floating-point array (float32, float16, bfloat16 or float64); got dtype {arr.dtype}"
        )
    orig = _dtypes.normalize_dtype(arr.dtype, what=f"{what} dtype")
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape}); there is nothing to quantize")
    work = np.float32 if orig == _dtypes.float64 else orig
    arr = np.asarray(arr, dtype=work, order="C")  # keeps 0-d shapes, copies only if needed
    return arr, orig


def _raw(arr):
    """1-D uint8 view of a contiguous array's bytes."""
    return arr.reshape(-1).view(np.uint8)


def _call_checked(fn, arr, what, *args):
    sync_threads()
    try:
        fn(*args)
    except NonFiniteError:
        flat = arr.reshape(-1).astype(np.float32)
        bad = int(np.flatnonzero(~np.isfinite(flat))[0])
        index = tuple(int(i) for i in np.unravel_index(bad, arr.shape))
        value = float(flat[bad])
        raise NonFiniteError(
            f"{what} contains {value} at index {index}: quantization needs finite values; "
            f"replace or mask NaN/Inf before quantizing",
            index=index,
            value=value,
        ) from None


def quantize(x, codebook="nf4", blocksize=64, double_quant=True, hessian=None, damp=0.01, order="natural"):
    """Quantize a float array to blockwise 4-bit codes.

    The array is read flat in C order and cut into blocks of `blocksize`
    elements (the last block may be shorter). Each block keeps its absmax as
    scale and each element the code of the codebook value nearest to
    ``x / absmax`` (ties go to the lower value), exactly as bitsandbytes does.

    Parameters
    ----------
    x : array_like
        float32, float16, bfloat16 (``ml_dtypes``) or float64 values, any shape.
        float64 is rounded to float32 first (all arithmetic is float32).
        All values must be finite.
    codebook : {"nf4", "fp4", "int4", "nf2", "nf3"}
        The 4-bit value table (see :func:`pyqlora.codebook`).
    blocksize : {32, 64, 128, 256, 512, 1024, 2048, 4096}
        Elements per block; QLoRA uses 64.
    double_quant : bool
        Quantize the float32 block scales to 8 bits (QLoRA's double
        quantization): about 4.127 instead of 4.5 bits per parameter at
        blocksize 64. The default follows the QLoRA recipe (bitsandbytes'
        functional API defaults to False, its ``Linear4bit`` to True).
    hessian : array_like, optional
        Calibrated rounding: the ``K x K`` second moment ``X^T X`` of the inputs
        ``X`` (tokens x K) of a layer ``y = x W^T`` whose weight is `x` (a 2-D
        ``(out_features, K)`` array). The codes and block scales are then chosen
        column by column with the error feedback of GPTQ / Optimal Brain
        Quantization (Frantar et al., 2022) to keep ``X (W - W_q)^T`` small
        rather than ``W - W_q``; the result is the same format, only the codes and
        block scales differ (docs/quality.md, section 4). Only the direction of `hessian` matters, not its
        scale. Without it (the default) the result is round-to-nearest, byte
        for byte as before.
    damp : float
        With `hessian`: ``damp * mean(diag(H))`` is added to the diagonal before
        it is inverted (GPTQ's 1 %); must be >= 0.
    order : {"natural", "act"}
        With `hessian`: the column order of the solve. ``"act"`` visits the
        columns of large ``diag(H)`` first (GPTQ's act-order); the stored layout
        is the ordinary one either way, and each block's scale is fixed, from the
        error-updated weights, when the first of its columns is visited.

    Returns
    -------
    QuantizedArray

    Raises
    ------
    TypeError
        For a non-float input or a non-integer blocksize.
    ValueError
        For an empty input, a bad blocksize or an unknown codebook; with
        `hessian`: a weight that is not 2-D, a `hessian` of the wrong shape, not
        finite, not symmetric, or not positive definite after dampening, a bad
        `damp` or `order`.
    NonFiniteError
        For a NaN or Inf in the input (the message gives its index).

    Examples
    --------
    >>> import numpy as np, pyqlora as pq
    >>> w = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    >>> q = pq.quantize(w)                      # NF4, blocksize 64, double quantization
    >>> q
    QuantizedArray(shape=(256, 512), dtype=float32, codebook='nf4', blocksize=64, double_quant, bits_per_param=4.127)
    >>> err = np.linalg.norm(pq.dequantize(q) - w) / np.linalg.norm(w)
    >>> bool(0.05 < err < 0.15)
    True

    Calibrated rounding with the inputs' second moment (here correlated inputs):

    >>> x = rng = np.random.default_rng(1)
    >>> x = rng.standard_normal((2048, 512)).astype(np.float32) @ rng.standard_normal((512, 512)).astype(np.float32)
    >>> qc = pq.quantize(w, hessian=x.T @ x)
    >>> out_err = lambda q: float(np.linalg.norm(x @ (w - pq.dequantize(q)).T))
    >>> bool(out_err(qc) < 0.8 * out_err(q))     # output error well below round-to-nearest's
    True
    >>> qc.nbytes == q.nbytes                    # the same format and size
    True
    """
    name = check_codebook(codebook)
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if hessian is not None:
        return quantize_calibrated(x, name, blocksize, bool(double_quant), hessian, damp, order)
    if _cuda.is_cuda_array(x):  # GPU arrays stay on the device (pyqlora/_cuda.py, not yet verified on a GPU)
        return _cuda.quantize(x, name, blocksize, bool(double_quant))
    arr, orig = _as_input(x)
    n = arr.size
    nblocks = -(-n // blocksize)
    table = lookup_table(name, 16)
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(nblocks, dtype=np.float32)
    _call_checked(
        _ext.quantize, arr, "x", 4, _raw(arr), _dtypes.KERNEL_DTYPES[arr.dtype], n, blocksize, table, packed, absmax
    )
    return _finish(arr.shape, orig, name, blocksize, double_quant, packed, absmax)


def _finish(shape, orig, name, blocksize, double_quant, packed, absmax):
    nested_absmax = offset = None
    if double_quant:
        absmax, nested_absmax, offset = _double_quantize(absmax)
    return QuantizedArray(
        shape=shape,
        dtype=orig,
        codebook=name,
        blocksize=blocksize,
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        nested_offset=offset,
    )


_TRI_INV_BASE = 128


def _lower_triangular_inverse(low):
    """The inverse of the lower triangular float64 matrix `low`, by halves:
    ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``, the products in NumPy's
    BLAS. About K^3 / 3 multiply-adds, where ``np.linalg.inv`` (an LU solve of the
    identity) takes 2 K^3 at a fraction of the BLAS rate: 0.22 s against 0.05 s for
    K = 1536 on a 2-core AMD EPYC Zen 4 (it was the largest share of the solves in
    calibrating SmolLM2-135M). Exactly zero above the diagonal."""
    n = low.shape[0]
    if n <= _TRI_INV_BASE:
        return np.tril(np.linalg.inv(low))
    h = n // 2
    a_inv = _lower_triangular_inverse(low[:h, :h])
    d_inv = _lower_triangular_inverse(low[h:, h:])
    out = np.zeros((n, n), dtype=low.dtype)
    out[:h, :h] = a_inv
    out[h:, h:] = d_inv
    out[h:, :h] = -(d_inv @ (low[h:, :h] @ a_inv))
    return out


def hessian_factor(hessian, cols, damp=0.01, order="natural"):
    """Checked, dampened `hessian` -> (U, perm, dead) for the calibrated kernel (float64).

    U is the upper Cholesky factor of ``(P (H + damp mean(diag H) I) P^T)^-1``
    (``U^T U``), ``P`` the column order `perm` (None: natural); `dead` marks the
    inputs with ``H[i, i] == 0`` (never nonzero: their weights do not matter, they
    are set to zero and their diagonal to 1, as GPTQ does).

    The factorization runs in NumPy's LAPACK and BLAS (float64: one Cholesky, then
    the inverse of the triangular factor by :func:`_lower_triangular_inverse`): O(K^3)
    once per distinct H, a small part of the solve's O(rows K^2) for the layers of a
    model, in double precision, which the inverse of an ill-conditioned H needs, and
    without a linear-algebra library in nf4core.
    """
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating, np.integer)):
        raise TypeError(f"damp must be a number, got {damp!r}")
    damp = float(damp)
    if not (np.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if order not in ("natural", "act"):
        raise ValueError(f"order must be 'natural' or 'act', got {order!r}")
    h = _dtypes.as_numpy(hessian)
    if h.dtype.kind not in "fiu" and h.dtype != _dtypes.bfloat16:
        raise TypeError(f"hessian must be a real array (float32 or float64), got dtype {h.dtype}")
    if h.shape != (cols, cols):
        raise ValueError(f"hessian has shape {h.shape}; a weight with {cols} input columns needs ({cols}, {cols})")
    h = np.array(h, dtype=np.float64, order="C")
    bad = ~np.isfinite(h)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"hessian is not finite: hessian[{i}, {j}] = {h[i, j]}")
    scale = float(np.abs(h).max())
    asym = float(np.abs(h - h.T).max())
    if asym > 1e-4 * scale:
        raise ValueError(f"hessian is not symmetric: max |H - H^T| = {asym:.3g} (max |H| = {scale:.3g}); "
                         "pass the second moment X^T X of the layer's inputs")
    h = (h + h.T) / 2
    diag = np.diag(h).copy()
    if (diag < 0).any():
        i = int(np.flatnonzero(diag < 0)[0])
        raise ValueError(f"hessian is not positive semi-definite: diagonal entry hessian[{i}, {i}] = {diag[i]} < 0")
    dead = diag == 0
    if dead.any():
        h[dead, :] = 0
        h[:, dead] = 0
        h[np.flatnonzero(dead), np.flatnonzero(dead)] = 1
        diag[dead] = 1
    perm = None
    if order == "act":
        perm = np.argsort(-diag, kind="stable").astype(np.int64)
        h = h[np.ix_(perm, perm)]
    h[np.diag_indices(cols)] += damp * float(diag.mean())
    # U = M^-1 for H = M M^T with M upper triangular: the lower Cholesky factor L of the
    # reversed H (J H J = L L^T) gives M = J L J, so U = J L^-1 J, and U^T U = H^-1.
    try:
        low = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        raise ValueError(f"hessian is not positive definite after dampening (damp={damp}): add more calibration "
                         "tokens or raise damp") from None
    u = _lower_triangular_inverse(low)[::-1, ::-1]
    if not np.isfinite(u).all():
        raise ValueError(f"hessian is too ill-conditioned to invert after dampening (damp={damp}); raise damp")
    return np.ascontiguousarray(u), perm, dead


def _gptq_codes(w, u, perm, name, blocksize, ref=False):
    """(packed, absmax) of the calibrated kernel: float32 `w` and `u`, or float64 ones with `ref`."""
    rows, cols = w.shape
    n = w.size
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(-(-n // blocksize), dtype=np.float32)
    order = np.empty(0, np.int64) if perm is None else np.ascontiguousarray(perm, dtype=np.int64)
    sync_threads()
    _ext.gptq_quantize(w.reshape(-1), rows, cols, u.reshape(-1), order, blocksize, lookup_table(name, 16),
                       packed, absmax, ref)
    return packed, absmax


def quantize_calibrated(x, name, blocksize, double_quant, hessian, damp, order, factors=None):
    """quantize(hessian=...); `factors` (a dict, optional) keeps hessian_factor's result per hessian object, for
    layers that share one input (q/k/v) and so one X^T X: the float64 factorization then runs once."""
    if _cuda.is_cuda_array(x):
        raise ValueError("calibrated rounding (hessian=) runs on the CPU: pass a CPU array")
    arr, orig = _as_input(x)
    if arr.ndim != 2:
        raise ValueError(f"hessian= needs a 2-D weight (out_features, in_features); x has shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        value = float(arr[index])
        raise NonFiniteError(f"x contains {value} at index {index}: quantization needs finite values; "
                             f"replace or mask NaN/Inf before quantizing", index=index, value=value)
    key = (id(hessian), damp, order)
    if factors is not None and key in factors and factors[key][0] is hessian:
        u, perm, dead = factors[key][1]
    else:
        u, perm, dead = hessian_factor(hessian, arr.shape[1], damp, order)
        u = u.astype(np.float32)
        if factors is not None:
            factors[key] = (hessian, (u, perm, dead))
    w = np.array(arr, dtype=np.float32, order="C")
    w[:, dead] = 0
    packed, absmax = _gptq_codes(w, u, perm, name, blocksize)
    return _finish(arr.shape, orig, name, blocksize, double_quant, packed, absmax)


def _double_quantize(absmax):
    nblocks = absmax.size
    qabsmax = np.empty(nblocks, dtype=np.uint8)
    nested = np.empty(-(-nblocks // DQ_BLOCKSIZE), dtype=np.float32)
    offset = _ext.double_quantize(absmax, lookup_table("dynamic", 256), qabsmax, nested)
    return qabsmax, nested, offset


def _check_out(out, shape, dtype):
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"out has shape {out.shape}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected {dtype}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out is read-only")


def _resolve_out_dtype(dtype, out, default):
    if dtype is None:
        return _dtypes.normalize_dtype(out.dtype, what="out dtype") if isinstance(out, np.ndarray) else default
    return _dtypes.normalize_dtype(dtype)


def _dequantize_into(bits, codes, scales, n, blocksize, table, shape, dtype, out):
    """Run the `bits`-bit dequantize kernel into `out` (allocated if None), handling float64."""
    if out is None:
        out = np.empty(shape, dtype=dtype)
    else:
        _check_out(out, shape, dtype)
    target = out
    if dtype == _dtypes.float64:
        target = np.empty(shape, dtype=np.float32)
    elif np.may_share_memory(out, codes) or np.may_share_memory(out, scales):
        target = np.empty(shape, dtype=dtype)  # out overlaps the input: the kernel must not write over it
    sync_threads()
    _ext.dequantize(bits, codes, scales, n, blocksize, table, _raw(target), _dtypes.KERNEL_DTYPES[target.dtype])
    if target is not out:
        out[...] = target
    return out


def dequantize(q, dtype=None, out=None):
    """Turn a :class:`QuantizedArray` back into floats.

    Each element becomes ``codebook[code] * absmax[block]`` computed in
    float32, then rounded to `dtype` (round to nearest even).

    Parameters
    ----------
    q : QuantizedArray
    dtype : dtype, optional
        float32, float16, bfloat16 or float64; defaults to ``q.dtype`` (the
        dtype that was quantized), or to ``out.dtype`` when `out` is given.
    out : numpy.ndarray, optional
        C-contiguous writable array of shape ``q.shape`` to write into.

    Returns
    -------
    numpy.ndarray

    Examples
    --------
    >>> import numpy as np, pyqlora as pq
    >>> q = pq.quantize(np.array([-1.0, 1.0, 0.0, 0.5], np.float32), double_quant=False)
    >>> q.packed.tobytes().hex()
    '0f7c'
    >>> pq.dequantize(q)                        # 0.5 lies below the midpoint 0.5017 of 0.4407 and 0.5626
    array([-1.        ,  1.        ,  0.        ,  0.44070983], dtype=float32)
    >>> pq.dequantize(q, dtype="bfloat16").dtype
    dtype(bfloat16)
    """
    if isinstance(q, _cuda.CudaQuantizedArray):  # stays on the device
        return _cuda.dequantize(q, dtype, out)
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
    dtype = _resolve_out_dtype(dtype, out, q.dtype)
    scales = block_scales(q)
    return _dequantize_into(
        4, q.packed, scales, q.size, q.blocksize, lookup_table(q.codebook, 16), q.shape, dtype, out
    )


def _table_8bit(codebook):
    if isinstance(codebook, str):
        name = codebook.lower()
        if name not in ("dynamic", "dynamic_unsigned", "nf8"):
            raise ValueError(f"unknown 8-bit codebook {codebook!r}; expected 'dynamic', 'dynamic_unsigned' or 'nf8'")
        return lookup_table(name, 256)
    table = np.ascontiguousarray(codebook, dtype=np.float32)
    if table.shape != (256,):
        raise ValueError(f"an 8-bit codebook needs 256 values, got shape {table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError("codebook values must be finite")
    return table


def quantize_blockwise(x, blocksize=256, codebook="dynamic"):
    """Blockwise 8-bit quantization (bitsandbytes' ``quantize_blockwise``).

    Parameters
    ----------
    x : array_like
        Finite float32, float16, bfloat16 or float64 values.
    blocksize : {32, 64, ..., 4096}
        Elements per block; bitsandbytes uses 256 for optimizer states and DQ.
    codebook : {"dynamic", "dynamic_unsigned", "nf8"} or array_like of 256 floats
        The value table; the default is the signed dynamic map.

    Returns
    -------
    codes : numpy.ndarray
        uint8, same shape as `x`.
    absmax : numpy.ndarray
        float32 scale of each block.

    Examples
    --------
    >>> import numpy as np, pyqlora as pq
    >>> x = np.linspace(-2, 2, 1000, dtype=np.float32)
    >>> codes, absmax = pq.quantize_blockwise(x)
    >>> codes.dtype, absmax.shape
    (dtype('uint8'), (4,))
    >>> bool(np.abs(pq.dequantize_blockwise(codes, absmax) - x).max() < 0.02)
    True
    """
    blocksize = check_blocksize(blocksize)
    table = _table_8bit(codebook)
    arr, _ = _as_input(x)
    codes = np.empty(arr.shape, dtype=np.uint8)
    absmax = np.empty(-(-arr.size // blocksize), dtype=np.float32)
    _call_checked(
        _ext.quantize,
        arr,
        "x",
        8,
        _raw(arr),
        _dtypes.KERNEL_DTYPES[arr.dtype],
        arr.size,
        blocksize,
        table,
        codes.reshape(-1),
        absmax,
    )
    return codes, absmax


def dequantize_blockwise(codes, absmax, blocksize=256, codebook="dynamic", dtype=None, out=None):
    """Inverse of :func:`quantize_blockwise`: ``codebook[code] * absmax[block]``.

    Parameters
    ----------
    codes : array_like of uint8
    absmax : array_like of float32
        One scale per block of `blocksize` codes.
    blocksize, codebook
        As given to :func:`quantize_blockwise`.
    dtype : dtype, optional
        Output dtype, float32 by default (or ``out.dtype``).
    out : numpy.ndarray, optional
        C-contiguous writable array shaped like `codes`.
    """
    blocksize = check_blocksize(blocksize)
    table = _table_8bit(codebook)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.size == 0:
        raise ValueError("codes is empty")
    codes = np.ascontiguousarray(codes)
    absmax = np.ascontiguousarray(absmax, dtype=np.float32).reshape(-1)
    need = -(-codes.size // blocksize)
    if absmax.size != need:
        raise ValueError(f"absmax has {absmax.size} scales; {codes.size} codes in blocks of {blocksize} need {need}")
    dtype = _resolve_out_dtype(dtype, out, _dtypes.float32)
    return _dequantize_into(
        8, codes.reshape(-1), absmax, codes.size, blocksize, table, codes.shape, dtype, out
    )
