"""Integrations with training tools built on PEFT (each imports its tool; none is imported
by the package itself).

* :mod:`.axolotl`: ``plugins: [matryoshka_lora.integrations.axolotl.MatryoshkaPlugin]`` with
  ``adapter: matryoshka`` in an axolotl config.
"""
