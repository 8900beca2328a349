"""The training log: ``training_log.jsonl``, and the experiment trackers that receive it.

Each record of a run (the loss and learning rate every ``log_every`` steps, the
rank curve at each evaluation) is one JSON line of ``training_log.jsonl`` and, with
``report_to``, one ``log`` call at the record's optimizer step on each of
accelerate's trackers (:mod:`accelerate.tracking`: ``tensorboard``, ``wandb``,
``mlflow``, ``trackio``, ...). The trackers get transformers' Trainer's names:

    loss -> train/loss        lr -> train/learning_rate      rank -> train/rank
    eval_<metric> -> eval/<metric>   (eval/token_accuracy_r4, eval/aurac, ...)

Values that are not numbers (a plan's description such as ``"all"``) stay in the
file only. The run's configuration goes to each tracker once, flattened to
``<section>.<field>`` scalars (its hyper-parameters). Trackers that write files
(TensorBoard, Aim) write under ``<output_dir>/logs/``; the others use their own
settings (``WANDB_*``, ``MLFLOW_TRACKING_URI``, ...), with the project or
experiment name :data:`PROJECT`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOG_NAME = "training_log.jsonl"
PROJECT = "matryoshka-lora"
NO_TRACKERS = ("none",)
_TRAIN_NAMES = {"lr": "learning_rate"}


def tracker_names() -> tuple[str, ...]:
    """The tracker names ``report_to`` accepts: accelerate's, plus ``all`` and ``none``."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return (*LOGGER_TYPE_TO_CLASS, "all", "none")


def check_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """The trackers of ``report_to``, each installed here (``all``: every installed one).

    Raises ``ValueError`` for an unknown name and for a tracker whose package is
    missing (with the ``pip install`` that adds it).
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or ())
    if not names or names == list(NO_TRACKERS):
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    known = tracker_names()
    unknown = [n for n in names if n not in known or n in NO_TRACKERS]
    if unknown:
        raise ValueError(
            f"unknown tracker {unknown[0]!r} in report_to: choose from {', '.join(known)} "
            "('none' alone)"
        )
    available = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    if "all" in names:
        return [n for n in LOGGER_TYPE_TO_CLASS if n in available]
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(
            f"report_to {missing[0]!r} needs its package, which is not installed: "
            f"pip install {missing[0]}"
        )
    return list(dict.fromkeys(names))


def tracker_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a log record under the trackers' names (``step`` is the step, not a value)."""
    values = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key.startswith("eval_"):
            values["eval/" + key.removeprefix("eval_")] = value
        else:
            values["train/" + _TRAIN_NAMES.get(key, key)] = value
    return values


def flat_config(config: Mapping[str, Mapping[str, Any]]) -> dict[str, bool | int | float | str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; a value that is not a scalar as JSON."""
    flat: dict[str, bool | int | float | str] = {}
    for section, fields in config.items():
        for name, value in fields.items():
            scalar = isinstance(value, bool | int | float | str)
            flat[f"{section}.{name}"] = value if scalar else json.dumps(value, default=str)
    return flat


class TrainingLog:
    """Appends records to ``<output_dir>/training_log.jsonl`` and forwards them to trackers.

    ``append=False`` starts a fresh file (a new run); ``True`` continues it (a
    resumed run). ``config`` (``{section: {field: value}}``) is stored once in each
    tracker. Create it on the main process only; :meth:`close` ends the trackers' runs.
    """

    def __init__(
        self,
        output_dir: str | Path,
        report_to: str | Iterable[str] | None = None,
        config: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        append: bool = False,
    ) -> None:
        output = Path(output_dir)
        self.path = output / LOG_NAME
        names = check_report_to(report_to)
        output.mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists():
            self.path.unlink()
        self.trackers: list[Any] = []
        if not names:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        for name in names:
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            kwargs = {"logging_dir": str(output / "logs")}
            tracker = tracker_class(
                PROJECT, **(kwargs if tracker_class.requires_logging_directory else {})
            )
            tracker.start()
            if config:
                tracker.store_init_configuration(flat_config(config))
            self.trackers.append(tracker)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` (with its optimizer ``step``) to the file and every tracker."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(record)) + "\n")
        values = tracker_values(record)
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=record["step"])

    def close(self) -> None:
        """End every tracker's run (flushes TensorBoard's event files)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()
