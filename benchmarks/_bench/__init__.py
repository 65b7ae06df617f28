"""Code shared by the benchmark scripts in benchmarks/ (not part of pyqlora, not installed).

The scripts are run as files (``python benchmarks/bench_kernels.py``, ``pyqlora bench``,
``torchrun benchmarks/bench_distributed.py``), so their own folder is ``sys.path[0]`` and
``import _bench`` finds this package with nothing to install.

No module here imports torch, bitsandbytes or torchao at module level: bench_kernels.py
imports these modules first and must still export OMP_NUM_THREADS
(``threads.set_thread_environment``) before any OpenMP runtime starts.
"""
