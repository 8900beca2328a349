"""Hugging Face Hub: model cards for PEFT exports and the upload of an export folder.

Every PEFT export folder gets a ``README.md`` model card written with
``huggingface_hub.ModelCard``: YAML metadata (``library_name: peft``,
``base_model``, ``tags``, ``pipeline_tag``) and a body that states the rank the
folder holds, how it was trained (R, the method, S, the scaling), how to load it
(PEFT, transformers, vLLM) and, when a rank sweep of the adapter is known, the
metric at every swept rank with the exported rank marked.

A multi-rank export (``rank-<r>/`` sub-folders) also gets a card at its root that
lists the sub-folders and how to load each one with ``subfolder=``.

:func:`push_to_hub` uploads a finished export folder as it is on disk with
``HfApi.create_repo`` + ``HfApi.upload_folder``: the folder that is sent is the
folder that was written and checked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import NestedLoraConfig

CARD_NAME = "README.md"
LIBRARY_TAGS: tuple[str, ...] = ("peft", "lora", "matryoshka-lora", "nested-rank")
_PIPELINE_TAGS = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation"}
# A Hub repo id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def hub_base_model(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repo id (not a local path), else None.

    The Hub validates ``base_model`` against existing repos, so a local folder
    such as ``/data/llama`` is left out of the metadata (it stays in the body).
    """
    if not name or os.path.isabs(name) or name.startswith((".", "~")):
        return None
    return name if _REPO_ID.fullmatch(name) else None


def _sweep_table(sweep: Any, rank: int | None) -> str | None:
    """A Markdown table ``rank | <metric> (<scale>) ...`` of a :class:`SweepResult`.

    Rows are the swept ranks; the row of the exported ``rank`` is marked. The
    base model (adapters off) is a last row when the sweep holds it.
    """
    if sweep is None:
        return None
    columns = [(m, s) for m in sweep.values for s in sweep.values[m]]
    if not columns:
        return None
    multi_scale = len({s for _, s in columns}) > 1
    heads = [f"{m} ({s})" if multi_scale else m for m, s in columns]
    lines = ["| rank | " + " | ".join(heads) + " |", "|---:|" + "---:|" * len(heads)]
    for r in sweep.ranks:
        cells = []
        for m, s in columns:
            value = sweep.values[m][s].get(r)
            cells.append("" if value is None else f"{value:.4g}")
        label = f"**{r}** (this folder)" if r == rank else str(r)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if sweep.base:
        cells = [f"{sweep.base[m]:.4g}" if m in sweep.base else "" for m, _ in columns]
        lines.append("| base model (no adapter) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _card_data(
    base_model: str | None,
    task_type: str | None,
    config: NestedLoraConfig,
    extra_tags: Sequence[str],
    metadata: Mapping[str, Any],
):
    from huggingface_hub import ModelCardData

    hub_base = hub_base_model(base_model)
    tags = [*LIBRARY_TAGS, config.method, *extra_tags]
    if hub_base is not None:
        tags.append(f"base_model:adapter:{hub_base}")
    return ModelCardData(
        library_name="peft",
        base_model=hub_base,
        pipeline_tag=_PIPELINE_TAGS.get(task_type or ""),
        tags=list(dict.fromkeys(tags)),
        matryoshka_lora=dict(metadata),
    )


def _use_lines(base: str | None, loading: list[str]) -> list[str]:
    """The card's "Use" section: load the base with transformers, then ``loading``."""
    return [
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        *loading,
        "```",
    ]


def _vllm_lines(max_rank: int, uniform: bool, scale_encoding: str = "baked") -> list[str]:
    from .serving import vllm_max_lora_rank

    how = (
        "the scale is folded into B (`lora_alpha = r`, scale 1)"
        if scale_encoding == "baked"
        else "the scale is expressed through `lora_alpha` / `use_rslora`, which vLLM applies "
        "as PEFT does"
    )
    lines = [
        "Serve it with vLLM (`--enable-lora --max-lora-rank "
        f"{vllm_max_lora_rank(max_rank)} --lora-modules name=<this folder>`); {how}, so vLLM "
        "computes what PEFT computes.",
    ]
    if not uniform:
        lines.append(
            "The ranks differ per module (`rank_pattern` / `alpha_pattern`): serve it only with "
            "a vLLM whose PEFT reader applies those patterns (0.33 does; older releases ignore "
            "them and compute a wrong scale)."
        )
    return lines


def adapter_card(
    peft_config: Mapping[str, Any],
    config: NestedLoraConfig,
    rank: int | None,
    module_ranks: Mapping[str, int] | None = None,
    sweep: Any = None,
    scale_encoding: str = "baked",
    quantization: Mapping[str, Any] | None = None,
    tags: Sequence[str] = (),
):
    """The ``ModelCard`` of one PEFT export folder.

    Args:
        peft_config: the folder's ``adapter_config.json`` payload.
        config: the nested adapter's config (R, method, S, scaling, ...).
        rank: the uniform rank the folder holds, or None for per-module ranks.
        module_ranks: per-module ranks (when ``rank`` is None).
        sweep: a :class:`~matryoshka_lora.eval.SweepResult` of the adapter, if known.
        scale_encoding: ``baked`` or ``alpha`` (see :mod:`matryoshka_lora.export`).
        quantization: the quantization config of the base the adapter was trained on.
        tags: extra Hub tags.
    """
    from huggingface_hub import ModelCard

    base = peft_config.get("base_model_name_or_path") or config.base_model_name_or_path
    ranks = dict(module_ranks or {})
    held = rank if rank is not None else max(ranks.values())
    metadata = {
        "rank": rank,
        "max_rank": config.r,
        "method": config.method,
        "train_ranks": list(config.train_ranks),
        "scaling": config.scaling,
        "alpha": config.alpha,
        "inference_scale": config.inference_scale,
        "scale_encoding": scale_encoding,
    }
    if rank is None:
        metadata["module_ranks"] = {"min": min(ranks.values()), "max": max(ranks.values())}
    if quantization:
        metadata["trained_on_quantized_base"] = dict(quantization)
    data = _card_data(base, peft_config.get("task_type"), config, tags, metadata)
    what = (
        f"rank **{rank}**"
        if rank is not None
        else f"per-module ranks {min(ranks.values())}..{max(ranks.values())} "
        f"({sum(ranks.values())} in total over {len(ranks)} modules)"
    )
    base_text = f"`{base}`" if base else "its base model"
    lines = [
        f"# {config.method} LoRA adapter at {what}",
        "",
        f"A standard PEFT LoRA adapter for {base_text}, exported at {what} from a nested-rank "
        f"adapter trained with matryoshka-lora (method `{config.method}`, "
        f"max rank R = {config.r}, train ranks S = {list(config.train_ranks)}, scaling "
        f"`{config.scaling}`, alpha {config.alpha}, inference scale `{config.inference_scale}`). "
        "Vanilla PEFT loads it; no matryoshka-lora code is needed to use it.",
        "",
        "| field | value |",
        "|---|---|",
        f"| rank held | {rank if rank is not None else 'per module (rank_pattern)'} |",
        f"| max rank R of the source adapter | {config.r} |",
        f"| target modules | `{peft_config.get('target_modules')}` |",
        f"| scale encoding | `{scale_encoding}` (lora_alpha = {peft_config.get('lora_alpha')}, "
        f"use_rslora = {peft_config.get('use_rslora')}) |",
    ]
    if quantization:
        lines.append(f"| trained on a quantized base | `{dict(quantization)}` |")
    lines += [
        "",
        *_use_lines(base, ['model = PeftModel.from_pretrained(base, "<this repo or folder>")']),
        "",
        *_vllm_lines(held, rank is not None, scale_encoding),
    ]
    if quantization:
        lines += [
            "",
            "The adapter was trained on the quantized base above: load the base with the same "
            "quantization config to get the function that was trained and evaluated.",
        ]
    table = _sweep_table(sweep, rank)
    if table is not None:
        lines += [
            "",
            "## Rank sweep",
            "",
            "The source adapter evaluated at every swept rank (one training run; each row is the "
            "adapter truncated to that rank; this folder holds the "
            f"`{config.inference_scale}` deployment):",
            "",
            table,
        ]
    return ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body="\n".join(lines)
    )


def collection_card(
    peft_config: Mapping[str, Any],
    config: NestedLoraConfig,
    ranks: Sequence[int],
    folder_name: str,
    sweep: Any = None,
    quantization: Mapping[str, Any] | None = None,
    tags: Sequence[str] = (),
):
    """The root ``ModelCard`` of a multi-rank export: one ``rank-<r>/`` sub-folder per rank."""
    from huggingface_hub import ModelCard

    base = peft_config.get("base_model_name_or_path") or config.base_model_name_or_path
    metadata = {
        "ranks": list(ranks),
        "max_rank": config.r,
        "method": config.method,
        "train_ranks": list(config.train_ranks),
        "scaling": config.scaling,
        "inference_scale": config.inference_scale,
    }
    if quantization:
        metadata["trained_on_quantized_base"] = dict(quantization)
    data = _card_data(base, peft_config.get("task_type"), config, tags, metadata)
    first = folder_name.format(rank=ranks[0])
    lines = [
        f"# {config.method} LoRA adapters at ranks {', '.join(map(str, ranks))}",
        "",
        f"One nested-rank adapter (max rank R = {config.r}, method `{config.method}`) exported "
        "as standard PEFT LoRA adapters, one sub-folder per rank:",
        "",
        "| sub-folder | rank |",
        "|---|---:|",
        *[f"| `{folder_name.format(rank=r)}` | {r} |" for r in ranks],
        "",
        *_use_lines(
            base,
            [
                f'model = PeftModel.from_pretrained(base, "<this repo>", subfolder="{first}")',
                *[
                    f'model.load_adapter("<this repo>", adapter_name="r{r}", '
                    f'subfolder="{folder_name.format(rank=r)}")'
                    for r in ranks[1:]
                ],
                'model.set_adapter("r' + str(ranks[-1]) + '")' if len(ranks) > 1 else "",
            ],
        ),
        "",
        *_vllm_lines(max(ranks), True),
    ]
    table = _sweep_table(sweep, None)
    if table is not None:
        lines += ["", "## Rank sweep", "", table]
    return ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body="\n".join(lines)
    )


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> Any:
    """Upload an export folder to the Hub model repo ``repo_id`` (created if missing).

    Calls ``HfApi(token=token).create_repo(repo_id, repo_type="model", private=private,
    exist_ok=True)`` (and ``create_branch`` for a ``revision``), then ``upload_folder(repo_id=..., folder_path=folder, ...)`` and
    returns what ``upload_folder`` returns (the commit info). The folder must
    hold a model card (``README.md``), as every export folder does.
    """
    from huggingface_hub import HfApi

    path = Path(folder)
    if not (path / CARD_NAME).is_file():
        raise ValueError(f"{path} has no {CARD_NAME} model card: it is not an export folder")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(path),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload {path.name} (matryoshka-lora PEFT export)",
    )
