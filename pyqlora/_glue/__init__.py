"""What the torch glue (``pyqlora.nn``, ``lora``, ``optim``, ``distributed``) shares (internal).

- :mod:`.tensors`: tensors and NumPy arrays over the same bytes, dtype maps, the dense weight;
- :mod:`.dtensor`: FSDP2's ``DTensor`` without importing ``torch.distributed`` early;
- :mod:`.products`: which product a 4-bit layer uses (fused, tiled, dense) and the tiled product;
- :mod:`.memory`: bytes and resident memory, each quantity defined once;
- :mod:`.modules`: small operations on ``nn.Module`` trees;
- :mod:`.files`: reading users' files (text, JSON, safetensors) with errors that name them;
- :mod:`.checkpoint`: a 4-bit checkpoint folder's files and layout, for ``pyqlora.lora.load_4bit``.

The array API below never imports this package; the application (``pyqlora.app``)
may, as it may import the public modules. See ``docs/architecture.md``.
"""
