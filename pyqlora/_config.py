"""Build and run-time configuration report."""
import platform
import sys

__all__ = ["show_config"]


def show_config(file=None):
    """Print (and return) how pyqlora was built and what it found at run time.

    Returns
    -------
    dict
        Versions of pyqlora, nf4core and the array dependencies, the kernel
        paths compiled in, and GPU support: ``cuda`` ("built (CUDA runtime
        X.Y)" or "not built") and ``cuda_devices`` (devices visible now).

    Examples
    --------
    >>> import io, pyqlora as pq
    >>> cfg = pq.show_config(file=io.StringIO())
    >>> cfg["nf4core"] == pq.__version__
    True
    """
    import numpy

    from . import _nf4core
    from ._runtime import (
        amx_available,
        available_isas,
        get_amx,
        get_isa,
        get_num_threads,
        get_threading,
    )
    from ._version import __version__

    try:
        import ml_dtypes

        mld = ml_dtypes.__version__
    except ImportError:  # pragma: no cover
        mld = "missing (bfloat16 unavailable)"
    cfg = {
        "pyqlora": __version__,
        "nf4core": _nf4core.core_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "numpy": numpy.__version__,
        "ml_dtypes": mld,
        "cpu_kernels": get_isa(),
        "cpu_kernels_available": ", ".join(available_isas()),
        "amx": ("in use" if get_amx() else "available, not in use") if amx_available() else "not available",
        "threads": get_num_threads(),
        "threading": get_threading(),
    }
    cfg.update(_cuda_config(_nf4core))
    width = max(map(len, cfg))
    for k, v in cfg.items():
        print(f"{k:<{width}}  {v}", file=file if file is not None else sys.stdout)
    return cfg


def _cuda_config(ext):
    """CUDA entries of show_config: built or not, and the devices seen now.

    ``cuda`` is ``"built (CUDA runtime X.Y)"`` or ``"not built"``;
    ``cuda_devices`` the number of devices the driver reports (0 without a
    driver or GPU; asking never fails).
    """
    built, count = ext.cuda_available()
    if not built:
        return {"cuda": "not built", "cuda_devices": 0}
    ver = ext.cuda_runtime_version()
    return {"cuda": f"built (CUDA runtime {ver // 1000}.{ver % 1000 // 10})", "cuda_devices": count}
