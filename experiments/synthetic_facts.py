"""Closed-book recall of invented facts: a benchmark where the adapter's capacity binds.

    python experiments/synthetic_facts.py --output outputs/synthetic-facts/e60 --entities 60

Each of ``entities`` invented people (random syllable names, never real ones) has
one value for each attribute of :data:`ATTRIBUTES` (a home town, a pet, an
employer), each an invented word drawn from a seeded syllable stream, so the base
model cannot know any answer. A fact is (entity, attribute, value); the target is
the value alone, so every answer token is recalled, none copied from the prompt.

Every attribute has training, validation and test templates (:data:`ATTRIBUTES`):
the train split asks every fact in each training phrasing, the validation split
asks ``val_size`` facts (a seeded sample) in the validation phrasing, and the test
split asks every fact in each test phrasing, shuffled so that any prefix of it is
a random sample. Validation and test questions are thus trained facts in words
the model never saw them asked in.

Records are in TRL's standard ``prompt-completion`` format (``{"prompt",
"completion"}``, the completion ``" <value>"``), which
:func:`matryoshka_lora.train.data.load_records` reads from a folder:
``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``. The comparison runner
(:func:`matryoshka_lora.compare.run.splits_for`) takes its validation examples
from a seeded permutation of ``train.jsonl`` (``torch.randperm(n, generator=
manual_seed(data_seed))``, the first ``val_size`` indices), so ``train.jsonl``
holds the training questions and the validation questions, each validation
question at one of those indices: the runner then validates on the validation
phrasing and trains on the training phrasings only (checked by
:func:`check_runner_splits`). A comparison passes ``--val-size val_size`` and
``--train-size`` the number of training questions (``meta.json``).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

# attribute -> (training templates, validation templates, test templates); {name} is
# the entity. Validation and test phrasings are never trained on, and differ from each other.
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "town": (
        ("Where does {name} live?", "{name}'s home town is", "{name} lives in the town of"),
        ("Which town is {name} from?",),
        (
            "In which town is {name}'s home?",
            "The town where {name} resides is",
            "Name the town {name} calls home:",
            "{name} has a house in the town of",
        ),
    ),
    "pet": (
        ("What is {name}'s pet called?", "{name}'s pet is named", "The name of {name}'s pet is"),
        ("What name does {name}'s pet have?",),
        (
            "What did {name} name their pet?",
            "The pet that belongs to {name} is called",
            "Name the animal that lives with {name}:",
            "{name} feeds a pet known as",
        ),
    ),
    "employer": (
        ("Which company does {name} work for?", "{name}'s employer is", "{name} works at"),
        ("Who employs {name}?",),
        (
            "What firm is {name} employed by?",
            "The company that pays {name} is",
            "Name the business {name} has a job at:",
            "{name} earns a salary from",
        ),
    ),
}
ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kl",
    "st",
    "tr",
    "sh",
    "th",
)
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "", "n", "r", "l", "s", "k", "x", "m")


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str


def invented_word(rng: random.Random, syllables: int) -> str:
    """A capitalised word of ``syllables`` random onset-vowel-coda syllables."""
    return "".join(
        rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)
    ).capitalize()


def invent_facts(entities: int, seed: int, syllables: int = 4) -> list[Fact]:
    """``entities`` people with one invented value of ``syllables`` syllables per
    attribute (about 1.9 tokens a syllable); names and values unique."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            word = invented_word(rng, syllables)
            if word not in used:
                used.add(word)
                return word

    facts = []
    for _ in range(entities):
        name = f"{fresh(2)} {fresh(2)}"
        facts += [Fact(name, attribute, fresh(syllables)) for attribute in ATTRIBUTES]
    return facts


def record(fact: Fact, template: str) -> dict[str, str]:
    return {"prompt": template.format(name=fact.entity), "completion": f" {fact.value}"}


def runner_val_indices(n: int, val_size: int, data_seed: int) -> list[int]:
    """The indices of ``train.jsonl`` that the comparison runner validates on."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(data_seed)).tolist()
    return order[:val_size]


def build_splits(
    entities: int, val_size: int, seed: int, data_seed: int, syllables: int = 4
) -> dict[str, list[dict[str, str]]]:
    """``train`` (training questions with the validation questions at the runner's
    validation indices), ``validation`` and ``test`` records."""
    facts = invent_facts(entities, seed, syllables)
    if val_size > len(facts):
        raise ValueError(
            f"{val_size} validation questions need that many facts, but {entities} entities "
            f"give {len(facts)}: raise --entities or lower --val-size"
        )
    train_t, val_t, test_t = (
        {a: templates[i] for a, templates in ATTRIBUTES.items()} for i in range(3)
    )
    training = [record(f, t) for f in facts for t in train_t[f.attribute]]
    test = [record(f, t) for f in facts for t in test_t[f.attribute]]
    rng = random.Random(seed + 1)
    validation = [record(f, rng.choice(val_t[f.attribute])) for f in rng.sample(facts, val_size)]
    rng.shuffle(training)
    rng.shuffle(test)
    n = len(training) + val_size
    val_at = dict(zip(runner_val_indices(n, val_size, data_seed), validation, strict=True))
    rest = iter(training)
    train = [val_at[i] if i in val_at else next(rest) for i in range(n)]
    return {"train": train, "validation": validation, "test": test}


def check_runner_splits(folder: Path, val_size: int, data_seed: int) -> None:
    """Raise unless the runner's split of ``train.jsonl`` gives exactly ``validation.jsonl``
    as validation and no validation question in training."""
    train = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    validation = [json.loads(x) for x in (folder / "validation.jsonl").read_text().splitlines()]
    picked = [train[i] for i in runner_val_indices(len(train), val_size, data_seed)]
    if picked != validation:
        raise AssertionError(f"{folder}: the runner's validation split is not validation.jsonl")
    questions = {r["prompt"] for r in validation}
    trained = [r for r in train if r["prompt"] in questions]
    if len(trained) != val_size:
        raise AssertionError(f"{folder}: a validation question also appears among training ones")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="folder for train/validation/test.jsonl")
    p.add_argument("--entities", type=int, default=60)
    p.add_argument("--val-size", type=int, default=48)
    p.add_argument("--syllables", type=int, default=4, help="syllables per value")
    p.add_argument("--seed", type=int, default=0, help="seed of the invented facts")
    p.add_argument("--data-seed", type=int, default=1234, help="the comparison spec's data_seed")
    args = p.parse_args()
    splits = build_splits(args.entities, args.val_size, args.seed, args.data_seed, args.syllables)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    check_runner_splits(out, args.val_size, args.data_seed)
    meta = {
        **vars(args),
        "train_size": len(splits["train"]) - args.val_size,
        "test_questions": len(splits["test"]),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
