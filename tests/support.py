"""Helpers that several test files share (no tests here)."""
import doctest


def run_doctests(module):
    """Run the Examples in `module`'s docstrings; doctest's (failed, attempted) counts."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in finder.find(module, module.__name__):
        if t.examples:
            runner.run(t)
    return runner.summarize(verbose=False)


def tiny_llama_config(transformers, **overrides):
    """A two-layer Llama of width 32 (4 heads, 2 KV heads, 64 tokens): real transformers code, tiny weights."""
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    return transformers.LlamaConfig(**{**shape, **overrides})


def train_lora_steps(model, steps=2):
    """Logits of the first forward, LoRA gradients of the first backward, LoRA weights after `steps`
    (PagedAdamW, lr 1e-2, a fixed batch of 2 x 24 token ids below 64): what a paged base must reproduce."""
    import torch

    from pyqlora.optim import PagedAdamW

    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 24))
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = grads = None
    for step in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if step == 0:
            logits = out.logits.detach().clone()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
    return logits, grads, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
