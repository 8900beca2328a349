"""Sub-commands of the ``matryoshka-lora`` command line (one module per command).

Each command module has ``add_parser(subparsers)``, which registers the
sub-command and its options, and ``run(args) -> int``, the exit status.
Heavy imports (transformers, datasets, lm-eval, matplotlib) happen inside
``run`` so that ``--help`` and option errors stay fast.

* :mod:`.train`: fine-tune a nested adapter on a causal LM or a sequence classifier.
* :mod:`.evaluate`: rank sweep of a saved adapter (``eval``).
* :mod:`.export`: PEFT LoRA folder or merged model at chosen ranks.
* :mod:`.info`: a saved adapter's config and parameter counts.
* :mod:`._common`: option types, config files, model loading, the error type.
"""
