"""One thread count for every library of a run, in two halves: the environment before
torch / bitsandbytes / torchao start their OpenMP runtime, the pools after."""
import os

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def set_thread_environment(threads):
    """Must run before torch, bitsandbytes or torchao is imported: their OpenMP runtime
    reads OMP_NUM_THREADS once, when it starts."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)


def set_library_threads(threads):
    """The run-time half: torch's intra-op pool and pyqlora's pool, where it has one."""
    report = {"requested": threads}
    import pyqlora as pq

    if hasattr(pq, "set_num_threads"):
        pq.set_num_threads(threads)
        report["pyqlora"] = pq.get_num_threads()
    else:
        report["pyqlora"] = "no set_num_threads (single-threaded kernels)"
    try:
        import torch

        torch.set_num_threads(threads)
        report["torch"] = torch.get_num_threads()
    except ImportError:
        report["torch"] = "missing"
    report.update({var: os.environ.get(var) for var in THREAD_ENV_VARS})
    return report
