"""Element types accepted by the array API and their nf4core codes."""
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
