"""FSDP2's DTensor, recognized without importing ``torch.distributed`` at start-up."""
import functools

__all__ = ["dtensor_class", "is_dtensor", "local"]


@functools.lru_cache(maxsize=None)
def dtensor_class():
    """``torch.distributed.tensor.DTensor`` (``torch.distributed._tensor`` before torch 2.5), or None."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def is_dtensor(t):
    """True for a DTensor (a parameter or gradient sharded by FSDP2)."""
    if type(t).__name__ != "DTensor":  # the cheap test first: most tensors are not
        return False
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t):
    """This rank's shard of a DTensor; `t` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t
