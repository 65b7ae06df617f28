"""Element types accepted by the array API, their nf4core codes, and NumPy views of tensors."""
import sys

import numpy as np

try:
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a hard dependency
    ml_dtypes = None
    bfloat16 = None

float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
float64 = np.dtype(np.float64)

# nf4core's nf4_dtype enum (nf4core/include/nf4core/common.h)
NF4_FLOAT32, NF4_FLOAT16, NF4_BFLOAT16 = 0, 1, 2

# dtypes the kernels read and write directly; float64 is computed in float32
KERNEL_DTYPES = {float32: NF4_FLOAT32, float16: NF4_FLOAT16}
if bfloat16 is not None:
    KERNEL_DTYPES[bfloat16] = NF4_BFLOAT16

SUPPORTED = ("float32", "float16", "bfloat16", "float64")


def normalize_dtype(dtype, what="dtype"):
    """Return the numpy dtype for a supported float dtype spec, or raise TypeError."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        dt = bfloat16
    else:
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"{what} must be one of {', '.join(SUPPORTED)}; got {dtype!r}") from exc
    if dt is not None and not dt.isnative:
        dt = dt.newbyteorder("=")
    if dt not in KERNEL_DTYPES and dt != float64:
        raise TypeError(f"{what} must be one of {', '.join(SUPPORTED)}; got {dt}")
    return dt


def dtype_name(dt):
    """Name used in bitsandbytes' JSON ('float32', 'float16', 'bfloat16', 'float64')."""
    if dt == bfloat16:
        return "bfloat16"
    return np.dtype(dt).name


# torch dtype name -> the NumPy type string of the same bytes (bfloat16 travels as uint16 bits)
_TORCH_TYPESTR = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "bfloat16": "<u2", "uint8": "|u1",
                  "int8": "|i1", "int16": "<i2", "int32": "<i4", "int64": "<i8", "bool": "|b1"}


class _TensorBytes:
    """``__array_interface__`` of a CPU tensor's memory; holds the tensor so that the view keeps it alive.

    Unlike ``Tensor.numpy()`` this leaves the storage resizable (FSDP2 frees gathered
    parameters by resizing their storage to 0)."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, t, typestr):
        self.tensor = t
        itemsize = t.element_size()
        self.__array_interface__ = {"data": (t.data_ptr(), False), "shape": tuple(t.shape),
                                    "strides": tuple(s * itemsize for s in t.stride()), "typestr": typestr,
                                    "version": 3}


def is_tensor(x):
    """True for a torch tensor, recognized by its methods (the array API never imports torch)."""
    return hasattr(x, "detach") and hasattr(x, "data_ptr") and hasattr(x, "element_size")


def as_numpy(x, resizable=False):
    """A NumPy view of `x` sharing its memory where it can: THE one way the array API reads buffers.

    A numpy array is returned as it is; a CPU torch tensor becomes an array over the
    same bytes (bfloat16 as ``ml_dtypes.bfloat16``) without a copy; anything else goes
    through ``np.asarray``. A tensor means torch is loaded already: its module is
    taken from ``sys.modules``, never imported here.

    Parameters
    ----------
    x : array_like or torch.Tensor
    resizable : bool
        Leave the tensor's storage resizable (``Tensor.numpy()`` marks it fixed, and
        FSDP2 frees gathered parameters by resizing their storage to 0). A little
        slower; for views of parameters that FSDP2 manages.

    Raises
    ------
    TypeError
        For a tensor on another device than the CPU, or of a dtype NumPy cannot hold.
    """
    if isinstance(x, np.ndarray):
        return x
    if not is_tensor(x):
        return np.asarray(x)
    t = x.detach() if x.requires_grad else x
    if not t.is_cpu:
        raise TypeError(f"expected a CPU tensor, got one on {t.device}; GPU arrays are not supported here")
    torch = sys.modules["torch"]
    bf16 = t.dtype == torch.bfloat16
    if not resizable:  # the fast path: torch's own view (about 1 microsecond)
        return t.view(torch.int16).numpy().view(bfloat16) if bf16 else t.numpy()
    name = str(t.dtype).replace("torch.", "")
    if name not in _TORCH_TYPESTR:
        raise TypeError(f"a {t.dtype} tensor has no NumPy counterpart")
    if t.numel() == 0:
        arr = np.empty(tuple(t.shape), dtype=np.dtype(_TORCH_TYPESTR[name]))
    else:
        arr = np.asarray(_TensorBytes(t, _TORCH_TYPESTR[name]))
    return arr.view(bfloat16) if bf16 else arr
