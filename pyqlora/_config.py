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
        paths compiled in, and GPU support.

    Examples
    --------
    >>> import io, pyqlora as pq
    >>> cfg = pq.show_config(file=io.StringIO())
    >>> cfg["nf4core"] == pq.__version__
    True
    """
    import numpy

    from . import _nf4core
    from ._runtime import available_isas, get_isa, get_num_threads
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
        "threads": get_num_threads(),
        "cuda": "not built",
    }
    width = max(map(len, cfg))
    for k, v in cfg.items():
        print(f"{k:<{width}}  {v}", file=file if file is not None else sys.stdout)
    return cfg
