"""The ``peft_type`` of this library's adapters, in a module that does not import PEFT.

Native saves (:mod:`matryoshka_lora.io`) write it into ``adapter_config.json`` and
:mod:`matryoshka_lora.peft` registers it with PEFT. PEFT looks it up in its
mappings; without ``matryoshka_lora.peft`` imported that lookup fails with
``KeyError: '<this string>'``, so the string names the package to install and import.
"""

PEFT_TYPE_NAME = "MATRYOSHKA_LORA (pip install matryoshka-lora; import matryoshka_lora.peft)"
