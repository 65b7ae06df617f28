"""The application: the ``pyqlora`` command line and the jobs behind it.

:mod:`.cli` (the commands), :mod:`.finetune` (the main job), :mod:`.data`
(training and evaluation text, the cache folder), :mod:`.evaluate` (perplexity,
generation), :mod:`.models` (real pretrained models from GGUF files),
:mod:`.checkpoint` (loading models, writing 4-bit checkpoints), :mod:`.weights`
(lazy weight mappings) and :mod:`.report` (summaries and plots).

The application uses only pyqlora's public modules and the torch glue's shared
helpers (``pyqlora._glue``); nothing below it imports it (``docs/architecture.md``).
"""
