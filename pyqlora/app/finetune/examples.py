"""Training examples: records -> token sequences with labels, batches, and the held-out split."""
import torch

from ..data import split_heldout

__all__ = ["IGNORE", "collate", "encode_and_split", "encode_records", "response_suffix", "generation_sample",
           "split_chunks", "split_records"]

IGNORE = -100  # the label of a position that is not scored (torch's cross_entropy ignore_index)


def response_suffix(tokenizer, prompt, response):
    """(prefix_text, response_text): the chat-formatted prompt up to the assistant's turn, and the rest."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prefix = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prefix):
            return prefix, full[len(prefix):]
    return prompt, response + (tokenizer.eos_token or "")


def encode_records(tokenizer, records, seq_len):
    """Token sequences with labels for training and evaluation.

    Prompt/response records become chat turns (the tokenizer's chat template,
    if it has one); their labels are the response tokens and the end-of-turn
    marker, everything else is ignored (-100). A response that does not fit in
    ``seq_len`` is cut; a prompt that leaves no room for any response token is
    skipped. Text records are concatenated (separated by the end-of-text token)
    and cut into ``seq_len`` chunks whose every token is a label.

    Returns
    -------
    examples : list of (input_ids list, labels list)
    stats : dict with ``truncated`` and ``skipped`` counts
    """
    examples, stats = [], {"truncated": 0, "skipped": 0}
    if all("text" in r for r in records):
        ids = []
        for r in records:
            ids += tokenizer(r["text"], add_special_tokens=False).input_ids
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        for i in range(0, len(ids) - 1, seq_len):
            chunk = ids[i:i + seq_len]
            if len(chunk) >= 2:
                examples.append((chunk, list(chunk)))
        return examples, stats
    for r in records:
        prefix, rest = response_suffix(tokenizer, r["prompt"], r["response"])
        p = tokenizer(prefix, add_special_tokens=False).input_ids
        a = tokenizer(rest, add_special_tokens=False).input_ids
        room = seq_len - len(p)
        if room < 1:
            stats["skipped"] += 1
            continue
        if len(a) > room:
            a = a[:room]
            stats["truncated"] += 1
        examples.append((p + a, [IGNORE] * len(p) + a))
    return examples, stats


def collate(batch, pad_id):
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, labels, mask


def split_records(records, heldout):
    """(train, heldout) records: a fixed shuffle for pairs, the tail of the text for text.

    Of the pairs, the held-out ones are drawn from all records; :func:`encode_and_split` draws them
    from the records that fit in ``seq_len`` (what ``pyqlora finetune`` does)."""
    if all("text" in r for r in records):
        return records, None  # text is split after chunking (see split_chunks)
    return split_heldout(records, heldout=heldout, seed=0)


def encode_and_split(tokenizer, records, seq_len, heldout):
    """Encode prompt/response records, then hold out `heldout` of those that fit in `seq_len`.

    A record whose prompt alone fills ``seq_len`` cannot be trained on or evaluated, so the held-out
    records are the first records of :func:`~pyqlora.app.data.split_heldout`'s fixed shuffle that fit:
    ``--heldout 20`` always evaluates 20 examples whatever ``--seq-len`` drops, and they are the same
    records as at a longer ``--seq-len`` where those fit. A fraction counts the records that fit.

    Returns
    -------
    train_records, held_records : lists of the records that fit
    train_examples, held_examples : lists of (input_ids, labels)
    stats : dict with ``truncated`` and ``skipped`` counts over all records
    """
    stats, encoded = {"truncated": 0, "skipped": 0}, []
    for r in records:
        ex, st = encode_records(tokenizer, [r], seq_len)
        for key in stats:
            stats[key] += st[key]
        encoded.append(ex[0] if ex else None)
    fit = [i for i, ex in enumerate(encoded) if ex is not None]
    k = max(round(heldout * len(fit)) if isinstance(heldout, float) else int(heldout), 1)
    if len(fit) <= k:
        raise ValueError(f"--seq-len {seq_len} keeps {len(fit)} of {len(records)} records, too few to hold out "
                         f"{k} (--heldout {heldout}) and train on the rest; raise --seq-len or hold out fewer")
    train, held = split_heldout(list(range(len(records))), heldout=k, seed=0, eligible=fit)
    train = [i for i in train if encoded[i] is not None]
    return ([records[i] for i in train], [records[i] for i in held], [encoded[i] for i in train],
            [encoded[i] for i in held], stats)


def split_chunks(examples, heldout):
    n = len(examples)
    if n < 2:
        raise ValueError(f"the text gives only {n} chunk(s) of --seq-len tokens; need at least 2 (one held out)")
    k = round(heldout * n) if isinstance(heldout, float) else int(heldout)
    k = min(max(k, 1), n - 1)
    return examples[:n - k], examples[n - k:]


def generation_sample(records_heldout, heldout_examples, tokenizer):
    """(prompt, as a chat turn?, id) of the sample generation: the first held-out record, or held-out text."""
    if records_heldout:
        return records_heldout[0]["prompt"], True, records_heldout[0].get("id")
    ids = heldout_examples[0][0][:48]
    return tokenizer.decode(ids), False, "held-out text"
