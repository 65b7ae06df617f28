"""Small operations on ``torch.nn.Module`` trees that the glue and the application share."""
from torch import nn

__all__ = ["output_head", "set_submodule"]


def set_submodule(model, name, module):
    """Replace the submodule at dotted path `name` of `model` by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def output_head(model):
    """The model's output head (``get_output_embeddings()``) if it is an ``nn.Linear``, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None
