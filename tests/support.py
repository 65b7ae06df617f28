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
