"""Small operations on ``torch.nn.Module`` trees that the glue and the application share."""
from torch import nn

__all__ = ["enable_activation_checkpointing", "output_head", "set_submodule"]


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


def enable_activation_checkpointing(model):
    """A Hugging Face model's activation (gradient) checkpointing, non-reentrant; False if it has none.

    Under the name transformers 5 gives it (``activation_checkpointing_enable``: its old
    ``gradient_checkpointing_enable`` warns of its removal in v6), else the old one.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return False
    return True
