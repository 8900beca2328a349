"""Options generated from the config dataclasses: declarations, parser, precedence.

``train``'s options are fields of ``NestedLoraConfig``, ``TrainConfig`` and
``RunOptions``; these tests pin that the parser, the config-file keys and the
merge of defaults < preset < config file < command line follow from them.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import pytest

from matryoshka_lora import cli
from matryoshka_lora.commands import options as opts
from matryoshka_lora.commands import train as train_command
from matryoshka_lora.commands import train_options
from matryoshka_lora.config import A_INITS, NestedLoraConfig
from matryoshka_lora.nesting import INFERENCE_SCALES, METHODS, NORMALIZATIONS, SCALINGS
from matryoshka_lora.sampling import DISTRIBUTIONS, FREQUENCIES
from matryoshka_lora.train.loop import TrainConfig
from matryoshka_lora.train.objective import OBJECTIVES, PrefixLoss, RankSampling

BASE = ["train", "--model", "m", "--dataset", "d"]


def parse(tmp_path, file_text: str | None, *flags: str):
    argv = list(BASE)
    if file_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(file_text)
        argv += ["--config", str(path)]
    return cli.parse_args([*argv, *flags])


@pytest.mark.parametrize(
    "owner", [NestedLoraConfig, TrainConfig, train_options.RunOptions, PrefixLoss, RankSampling]
)
def test_every_field_declares_its_help(owner):
    for field in dataclasses.fields(owner):
        if field.name != "extra":  # TrainConfig.extra: free-form data for callers
            assert field.metadata.get("help"), f"{owner.__name__}.{field.name}"


def test_choices_come_from_the_literal_types():
    by_dest = {o.dest: o for o in train_options.OPTIONS}
    for dest, values in [
        ("method", METHODS),
        ("scaling", SCALINGS),
        ("normalize", NORMALIZATIONS),
        ("inference_scale", INFERENCE_SCALES),
        ("init_a", A_INITS),
        ("sampler_distribution", DISTRIBUTIONS),
        ("sampler_per", FREQUENCIES),
    ]:
        assert by_dest[dest].choices == values, dest
        hint = typing.get_type_hints(by_dest[dest].owner)[by_dest[dest].field]
        literal = next(a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is Literal)
        assert typing.get_args(literal) == values, dest


def test_help_and_defaults_are_the_fields():
    by_dest = {o.dest: o for o in train_options.OPTIONS}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    lr = by_dest["lr"]
    assert (lr.field, lr.default, lr.help) == (
        "learning_rate",
        fields["learning_rate"].default,
        fields["learning_rate"].metadata["help"],
    )
    assert lr.flags == ("--lr", "--learning-rate") and lr.keys == ("lr", "learning_rate")
    assert by_dest["r"].default == NestedLoraConfig().r
    assert by_dest["bf16"].kind == opts.FLAG and by_dest["overwrite"].kind == opts.SWITCH
    shipped = {"lora-svd", "full", "prefix-loss", "rank-sampling"}
    assert shipped <= set(by_dest["objective"].choices) <= set(OBJECTIVES)
    assert (by_dest["prefix_loss_sample"].owner, by_dest["prefix_loss_sample"].field) == (
        PrefixLoss,
        "sample",
    )


def test_an_unsupported_field_type_is_a_clear_error():
    @dataclasses.dataclass
    class Odd:
        betas: tuple[float, float] = dataclasses.field(default=(0.9, 0.99), metadata={"help": "h"})

    with pytest.raises(TypeError, match="Odd.betas: no command-line type"):
        opts.option(Odd, "betas")


def test_flag_beats_config_file_beats_preset_beats_default(tmp_path):
    assert parse(tmp_path, None).inference_scale == "trained"  # the field's default
    preset = ("--preset", "matryoshka-paper")
    assert parse(tmp_path, None, *preset).inference_scale == "paper"
    file = "inference-scale: trained\n"
    assert parse(tmp_path, file, *preset).inference_scale == "trained"  # file > preset
    args = parse(tmp_path, file, *preset, "--inference-scale", "paper")
    assert args.inference_scale == "paper"
    assert args.init_a == "authors"  # set by the preset alone
    # a preset named in the file applies too; the command line's --preset replaces it
    args = parse(tmp_path, "preset: matryoshka-paper\n")
    assert (args.init_a, args.inference_scale) == ("authors", "paper")
    args = parse(tmp_path, "preset: matryoshka-paper\n", "--preset", "lora")
    assert (args.method, args.init_a, args.inference_scale) == ("lora", "peft", "trained")


def test_a_list_option_given_as_a_flag_replaces_the_file_list(tmp_path):
    file = "r: 8\ntrain-ranks: [1, 2, 8]\ntarget-modules: [q_proj, v_proj]\n"
    args = parse(tmp_path, file)
    assert args.train_ranks == (1, 2, 8) and args.target_modules == ["q_proj", "v_proj"]
    args = parse(tmp_path, file, "--train-ranks", "1,8", "--target-modules", "o_proj")
    assert args.train_ranks == (1, 8) and args.target_modules == ["o_proj"]
    # a flag of an exclusive group replaces the file's rival
    args = parse(tmp_path, file, "--target-regex", ".*q_proj")
    assert args.target_modules is None and args.target_regex == ".*q_proj"
    adapter, _, _ = train_command.check_options(args)
    assert adapter.target_modules == ".*q_proj" and adapter.train_ranks == (1, 2, 8)
    args = parse(tmp_path, "target-regex: '.*'\n", "--target-modules", "q_proj")
    assert args.target_modules == ["q_proj"] and args.target_regex is None


def test_merge_resets_the_rivals_of_a_later_layer():
    layers = [
        {"a": None, "b": None, "c": 1},
        {"a": ["x"], "c": 2},
        {"b": "re"},
    ]
    assert opts.merge(layers, [("a", "b")]) == {"a": None, "b": "re", "c": 2}
    assert opts.merge(layers[:2], [("a", "b")]) == {"a": ["x"], "b": None, "c": 2}


def test_parsing_without_flags_gives_no_option_attributes():
    parser = cli._subparsers(cli.build_parser())["train"]
    namespace = parser.parse_args(["--r", "4"])
    assert opts.given_values(namespace, train_options.OPTIONS) == {"r": 4}


def parse_eval(tmp_path, file_text: str | None, *flags: str):
    argv = ["eval", "some-adapter"]
    if file_text is not None:
        path = tmp_path / "e.yaml"
        path.write_text(file_text)
        argv += ["--config", str(path)]
    return cli.parse_args([*argv, *flags])


def test_eval_flag_beats_config_file_beats_default(tmp_path):
    args = parse_eval(tmp_path, None)
    assert (args.batch_size, args.inference_scales, args.metric) == (8, ["paper", "trained"], None)
    assert args.adapter == "some-adapter" and args.split is None  # None: the evaluator's default
    file = (
        "batch-size: 4\ninference-scales: [paper]\nsplit: validation\nmetric: [loss, perplexity]\n"
    )
    args = parse_eval(tmp_path, file)
    assert (args.batch_size, args.inference_scales, args.split) == (4, ["paper"], "validation")
    assert args.metric == ["loss", "perplexity"]
    args = parse_eval(tmp_path, file, "--batch-size", "2", "--inference-scales", "svd")
    assert (args.batch_size, args.inference_scales, args.split) == (2, ["svd"], "validation")
    # a repeatable option given on the command line replaces the file's list
    args = parse_eval(tmp_path, file, "--metric", "exact_match", "--metric", "loss")
    assert args.metric == ["exact_match", "loss"]
    assert parse_eval(tmp_path, "metric: loss\n").metric == ["loss"]  # one value: a list of one


def test_eval_options_are_the_fields_of_eval_options():
    from matryoshka_lora.commands import eval_options

    by_dest = {o.dest: o for o in eval_options.OPTIONS}
    assert {f.name for f in dataclasses.fields(eval_options.EvalOptions)} == set(by_dest)
    assert by_dest["metric"].kind == opts.REPEAT and by_dest["include_base"].kind == opts.FLAG
    assert by_dest["evaluator"].choices == eval_options.EVALUATORS
    parser = cli._subparsers(cli.build_parser())["eval"]
    namespace = parser.parse_args(["a", "--metric", "x", "--metric", "y"])
    assert opts.given_values(namespace, eval_options.OPTIONS) == {"metric": ["x", "y"]}
