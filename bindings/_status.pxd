# Turns an nf4core status into a Python exception (call with the GIL held,
# right after the C call, on the same thread: the message is per thread).
from cnf4core cimport (nf4_status, nf4_last_error, NF4_OK, NF4_ERROR_INVALID_ARGUMENT,
                       NF4_ERROR_NON_FINITE, NF4_ERROR_OUT_OF_MEMORY, NF4_ERROR_CUDA)


cdef inline int check(nf4_status status) except -1:
    if status == NF4_OK:
        return 0
    message = nf4_last_error().decode("utf-8", "replace")
    if status == NF4_ERROR_NON_FINITE:
        from pyqlora._errors import NonFiniteError
        raise NonFiniteError(message)
    if status == NF4_ERROR_INVALID_ARGUMENT:
        raise ValueError(message)
    if status == NF4_ERROR_OUT_OF_MEMORY:
        raise MemoryError(message)
    if status == NF4_ERROR_CUDA:
        raise RuntimeError(message)  # names the CUDA call, or says CUDA was not built
    raise RuntimeError("nf4core internal error: " + message)
