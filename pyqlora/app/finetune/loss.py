"""The training loss: cross-entropy on the label tokens, and its held-out mean."""
import torch
from torch.nn import functional as F

from .examples import IGNORE, collate

__all__ = ["batch_loss", "heldout_loss"]


def _parts(model):
    """(decoder, head) of a transformers causal LM (also through a PEFT wrapper), or (None, None)."""
    try:
        return model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def batch_loss(model, input_ids, labels, mask, whole=False):
    """(sum of token losses, number of label tokens) of one batch.

    Only the positions that have a label go through the output head (its
    49,152-way product is a fifth of a small model's work), which gives the same
    values as the full logits. ``whole=True`` calls the model itself instead (a
    DDP or FSDP2 model must be entered through its own forward).
    """
    target = labels[:, 1:]
    keep = target != IGNORE
    decoder, head = (None, None) if whole else _parts(model)
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


def heldout_loss(model, examples, batch_size, pad_id, autocast, whole=False):
    """Mean loss per label token over `examples` (no gradients).

    The examples are batched in order of length (a stable sort), so that a batch holds
    examples of similar length and little padding is computed (a quarter fewer tokens than
    in the given order on the default held-out set); the result is the same sum, up to
    float rounding, and the same order is used before and after training.
    """
    total, count = 0.0, 0
    by_length = sorted(examples, key=lambda ex: len(ex[0]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, len(by_length), batch_size):
                s, n = batch_loss(model, *collate(by_length[i:i + batch_size], pad_id), whole=whole)
                total += float(s)
                count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)
