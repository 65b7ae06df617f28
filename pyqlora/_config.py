"""Build and run-time configuration report."""
import os
import platform
import sys

__all__ = ["cpu_features", "default_compute_dtype", "show_config"]

# CPU features (Linux /proc/cpuinfo names) with which the hardware computes bfloat16 natively:
# x86 AVX512-BF16 or AMX-BF16, aarch64 FEAT_BF16. Elsewhere bfloat16 arithmetic is emulated
# (about 19x the float32 cost in torch on an AVX2-only CPU), so float32 is the faster choice.
_NATIVE_BF16 = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "aarch64 BF16"}
# oneDNN (torch's CPU GEMM for bfloat16) can be capped below the CPU with ONEDNN_MAX_CPU_ISA (older
# name DNNL_MAX_CPU_ISA); these caps still allow its native bfloat16 kernels (x86 only).
_ONEDNN_BF16_CAPS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")


def _onednn_cap():
    """The x86 ISA cap the user set for oneDNN, or None."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None


def cpu_features():
    """The CPU's feature flags as the operating system reports them (a frozenset of lower-case names).

    Linux: the ``flags`` (x86) or ``Features`` (aarch64) line of ``/proc/cpuinfo``; macOS on Apple
    silicon: ``bf16`` when ``sysctl hw.optional.arm.FEAT_BF16`` says so. Empty where unknown.
    """
    feats = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    feats.update(value.lower().split())
                    break
    except OSError:
        pass
    if not feats and sys.platform == "darwin":  # pragma: no cover - not on the project machines
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            if out == "1":
                feats.add("bf16")
        except (OSError, subprocess.SubprocessError):
            pass
    return frozenset(feats)


def default_compute_dtype(features=None, cuda_bf16=None):
    """The compute dtype ``auto`` stands for: ``("bfloat16" | "float32", reason)``.

    bfloat16 where the hardware computes it natively — a CUDA device with bfloat16 support
    (``cuda_bf16=True``, which callers that run on a GPU pass), or a CPU with one of AVX512-BF16,
    AMX-BF16 (x86) or BF16 (aarch64) — and float32 elsewhere, where bfloat16 arithmetic is emulated
    and costs many times the float32 step.

    Parameters
    ----------
    features : iterable of str, optional
        CPU feature flags; default :func:`cpu_features` of this machine.
    cuda_bf16 : bool, optional
        Whether the computation runs on a CUDA device that supports bfloat16; ``None``/``False``
        decide by the CPU.

    Notes
    -----
    Describing this machine (``features=None``), a cap on torch's oneDNN set with
    ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``) below ``AVX512_CORE_BF16`` also means float32: torch would
    emulate bfloat16 there although the CPU has it.

    Examples
    --------
    >>> import pyqlora as pq
    >>> pq.default_compute_dtype(features={"avx2", "fma"})
    ('float32', 'bfloat16 is emulated on this CPU (no AVX512-BF16, AMX-BF16 or aarch64 BF16)')
    >>> pq.default_compute_dtype(features={"avx2", "avx512_bf16"})[0]
    'bfloat16'
    >>> pq.default_compute_dtype(features=(), cuda_bf16=True)
    ('bfloat16', 'the CUDA device computes bfloat16 natively')
    """
    if cuda_bf16:
        return "bfloat16", "the CUDA device computes bfloat16 natively"
    feats = cpu_features() if features is None else {str(f).lower() for f in features}
    found = [name for flag, name in _NATIVE_BF16.items() if flag in feats]
    cap = _onednn_cap() if features is None else None  # this machine's run: honour the user's cap
    if found and cap and found != ["aarch64 BF16"] and not cap[1].upper().startswith(_ONEDNN_BF16_CAPS):
        return "float32", (f"{cap[0]}={cap[1]} keeps torch's bfloat16 products off {', '.join(found)}, "
                           "so bfloat16 would be emulated")
    if found:
        return "bfloat16", f"the CPU computes bfloat16 natively ({', '.join(found)})"
    return "float32", "bfloat16 is emulated on this CPU (no AVX512-BF16, AMX-BF16 or aarch64 BF16)"


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
        "compute_dtype_auto": "{} ({})".format(*default_compute_dtype()),
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
