"""Exceptions raised by pyqlora."""
from . import _nf4core

__all__ = ["NonFiniteError"]


class NonFiniteError(ValueError):
    """The input holds a NaN or an infinity, which cannot be quantized.

    Attributes
    ----------
    index : tuple of int or None
        Position of the first non-finite element (C order), when known.
    value : float or None
        That element's value (nan, inf or -inf).
    """

    def __init__(self, message, index=None, value=None):
        super().__init__(message)
        self.index = index
        self.value = value


_nf4core.set_error_classes(non_finite=NonFiniteError)  # the bindings raise it for NF4_ERROR_NON_FINITE
