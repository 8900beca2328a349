"""Sub-commands of the ``matryoshka-lora`` command line (one module per command).

Each command module declares ``NAME``, ``HELP``, ``DESCRIPTION`` (and ``CONFIG_FILE``
where options may come from a file), ``add_arguments(parser)``, which declares its
options, and ``run(args) -> int``, the exit status; ``_common.add_command`` builds
its parser.
Heavy imports (transformers, datasets, lm-eval, matplotlib) happen inside
``run`` so that ``--help`` and option errors stay fast.

* :mod:`.train`: fine-tune a nested adapter on a causal LM or a sequence classifier.
* :mod:`.evaluate`: rank sweep of a saved adapter (``eval``).
* :mod:`.export`: PEFT LoRA folder or merged model at chosen ranks.
* :mod:`.info`: a saved adapter's config and parameter counts.
* :mod:`._common`: the shared pieces in one import (help formatter, the sub-command
  parser, re-exports of :mod:`.errors`, :mod:`.config_files`, :mod:`.models`,
  :mod:`.inputs`); :mod:`.option_types`: the value types of options.
* :mod:`.option_spec`: an option declared once, as a dataclass field (help in
  ``metadata``, choices as ``Literal``); :mod:`.options`: the parser, config-file
  values and their precedence generated from such options.
* :mod:`.train_options`: ``train``'s options (``NestedLoraConfig``, ``TrainConfig``
  and the CLI-only :class:`~.train_options.RunOptions`); :mod:`.train_outputs`: its
  output folder.
* :mod:`.eval_options`: ``eval``'s options (:class:`~.eval_options.EvalOptions`);
  :mod:`.eval_inputs`: its records and metric functions.

A command whose options may come from a config file (``train``, ``eval``) sets a
``resolve`` default that turns the parsed namespace into the final one;
``cli.parse_args`` calls it.
"""
