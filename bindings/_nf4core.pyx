"""pyqlora._nf4core: the compiled bindings to nf4core (internal).

One extension module, so that nf4core's run-time state (thread pool, kernel
path) is shared by every binding; each concept lives in its own include file.
Python (pyqlora/_*.py) validates every argument first; these functions only
re-check buffer lengths, release the GIL around each C call and turn status
codes into exceptions.
"""
include "status.pxi"

include "codebook.pxi"
include "quantize.pxi"
include "runtime.pxi"
include "matmul.pxi"
include "optim.pxi"
include "pager.pxi"
include "cuda.pxi"
include "gptq.pxi"
