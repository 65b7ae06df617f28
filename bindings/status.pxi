# Turns an nf4core status into a Python exception (call with the GIL held,
# right after the C call, on the same thread: the message is per thread).
# The bindings know only arrays: the exception class for non-finite input is
# handed to this module once, by pyqlora/_errors.py (set_error_classes).
from cnf4core cimport (nf4_status, nf4_last_error, NF4_OK, NF4_ERROR_INVALID_ARGUMENT,
                       NF4_ERROR_NON_FINITE, NF4_ERROR_OUT_OF_MEMORY, NF4_ERROR_CUDA)

cdef object _NonFiniteError = ValueError


def set_error_classes(non_finite):
    """Use `non_finite` (a ValueError subclass) for NF4_ERROR_NON_FINITE from now on."""
    global _NonFiniteError
    if not (isinstance(non_finite, type) and issubclass(non_finite, ValueError)):
        raise TypeError(f"non_finite must be a subclass of ValueError, got {non_finite!r}")
    _NonFiniteError = non_finite


cdef inline int check(nf4_status status) except -1:
    if status == NF4_OK:
        return 0
    message = nf4_last_error().decode("utf-8", "replace")
    if status == NF4_ERROR_NON_FINITE:
        raise _NonFiniteError(message)
    if status == NF4_ERROR_INVALID_ARGUMENT:
        raise ValueError(message)
    if status == NF4_ERROR_OUT_OF_MEMORY:
        raise MemoryError(message)
    if status == NF4_ERROR_CUDA:
        raise RuntimeError(message)  # names the CUDA call, or says CUDA was not built
    raise RuntimeError("nf4core internal error: " + message)
