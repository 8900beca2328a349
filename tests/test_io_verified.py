"""Verified loads: adapter_config.json against the config recorded with the weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import all_rank_logits, make_tiny_llama, trained_llama

import matryoshka_lora as ml
from matryoshka_lora import io as mlio
from matryoshka_lora.cli import main as cli_main
from matryoshka_lora.io import read_adapter_config
from matryoshka_lora.model import adapter_layers, get_config, set_inference_scale

# each edit makes a valid config that is not the one the weights were trained with
TAMPERED = {
    "r": {"r": 16, "train_ranks": [1, 2, 4, 8, 16], "eval_ranks": [1, 2, 4, 8, 16]},
    "method": {"method": "matryoshka"},
    "train_ranks": {"train_ranks": [1, 8]},
    "scaling": {"scaling": "rank"},
    "alpha": {"alpha": 2.0},
    "normalize": {"normalize": "mean"},
    "target_modules": {"target_modules": ["q_proj", "v_proj"]},
    "dropout": {"dropout": 0.1},
    "init_a": {"init_a": "authors"},
    "adapter_dtype": {"adapter_dtype": "bfloat16"},
}


def edit_config(folder, changes):
    path = folder / "adapter_config.json"
    payload = json.loads(path.read_text())
    payload.update(changes)
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize("field", sorted(TAMPERED))
def test_tampered_field_is_refused_naming_it_and_both_values(tmp_path, field, capsys):
    model = trained_llama()
    ml.save_adapter(model, tmp_path)
    saved = get_config(model).to_dict()
    edit_config(tmp_path, TAMPERED[field])
    ml.NestedLoraConfig.from_dict(  # the edited config is valid on its own
        {**saved, **{k: tuple(v) if isinstance(v, list) else v for k, v in TAMPERED[field].items()}}
    )
    for changed, value in TAMPERED[field].items():
        if changed == "eval_ranks":
            continue
        pattern = rf"{changed}: adapter_config.json says {value!r}.*saved with {saved[changed]!r}"
        with pytest.raises(ml.AdapterCheckpointError, match=pattern.replace("[", r"\[")):
            ml.load_adapter(make_tiny_llama(), tmp_path)
        with pytest.raises(ml.AdapterCheckpointError, match=pattern.replace("[", r"\[")):
            read_adapter_config(tmp_path)
    assert cli_main(["info", str(tmp_path)]) == 2  # info refuses it the same way
    err = capsys.readouterr().err
    assert field in err and "does not match the config recorded with its weights" in err


@pytest.mark.parametrize(
    "changes",
    [
        {"inference_scale": "paper"},
        {"eval_ranks": [1, 8]},
        {"base_model_name_or_path": "elsewhere"},
    ],
)
def test_editable_fields_load_and_take_effect(tmp_path, input_ids, changes):
    model = trained_llama()
    ml.save_adapter(model, tmp_path)
    edit_config(tmp_path, changes)
    loaded = make_tiny_llama()
    ml.load_adapter(loaded, tmp_path)
    config = get_config(loaded)
    for key, value in changes.items():
        assert getattr(config, key) == (tuple(value) if isinstance(value, list) else value)
    if "inference_scale" in changes:
        set_inference_scale(model, "paper")
    want, got = all_rank_logits(model, input_ids), all_rank_logits(loaded, input_ids)
    for rank, logits in want.items():
        torch.testing.assert_close(got[rank], logits, atol=0, rtol=0)


def test_save_is_refused_on_a_file_path(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder.*pass a folder path"):
        ml.save_adapter(trained_llama(), target)
    assert target.read_text() == "not a folder"


def test_save_interrupted_between_weights_and_config_loads_the_previous_adapter(
    tmp_path, input_ids, monkeypatch
):
    """The state a kill between the two renames leaves: new weights, old config, and the
    previous weights still linked under their second name."""
    old, new = trained_llama(), trained_llama(scaling="rank")
    with torch.no_grad():
        for layer in adapter_layers(new).values():
            layer.lora_B.mul_(-2)
    ml.save_adapter(old, tmp_path / "old")
    ml.save_adapter(new, tmp_path / "new")
    folder = tmp_path / "interrupted"
    folder.mkdir()
    shutil.copy(tmp_path / "old" / mlio.CONFIG_NAME, folder / mlio.CONFIG_NAME)
    shutil.copy(tmp_path / "old" / mlio.WEIGHTS_NAME, folder / mlio.PREVIOUS_WEIGHTS_NAME)
    shutil.copy(tmp_path / "new" / mlio.WEIGHTS_NAME, folder / mlio.WEIGHTS_NAME)
    loaded = make_tiny_llama()
    with pytest.warns(UserWarning, match="interrupted before its config was written"):
        ml.load_adapter(loaded, folder)
    want, got = all_rank_logits(old, input_ids), all_rank_logits(loaded, input_ids)
    for rank, logits in want.items():
        torch.testing.assert_close(got[rank], logits, atol=0, rtol=0)
    with monkeypatch.context() as patch:  # a second save that fails keeps it loadable
        patch.setattr(mlio, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
        with pytest.raises(OSError, match="full"):
            ml.save_adapter(new, folder)
    with pytest.warns(UserWarning, match="interrupted"):
        torch.testing.assert_close(
            all_rank_logits(ml.load_adapter(make_tiny_llama(), folder), input_ids)[None],
            want[None],
        )
    ml.save_adapter(new, folder)  # the next save clears what the interrupted one left
    assert sorted(p.name for p in folder.iterdir()) == sorted([mlio.CONFIG_NAME, mlio.WEIGHTS_NAME])
    again = make_tiny_llama()
    ml.load_adapter(again, folder)
    torch.testing.assert_close(
        all_rank_logits(again, input_ids)[None], all_rank_logits(new, input_ids)[None]
    )


# what an adapter_config.json written before the training objective left the config held
EARLIER_TRAINING_FIELDS = {
    "dylora_update": "prefix",
    "prefix_loss": True,
    "prefix_loss_every": 1,
    "prefix_loss_full_weight": None,
    "prefix_loss_mode": "per_rank",
    "prefix_loss_sample": 1,
    "prefix_loss_start": 0,
    "prefix_sampling": 0.0,
}


def write_as_earlier_version(folder, **changes) -> None:
    """Rewrite a saved adapter in the earlier format: the training fields in both the
    JSON config and the config recorded in the weights' metadata, the hash updated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "adapter_config.json"
    payload = {**json.loads(path.read_text()), **EARLIER_TRAINING_FIELDS, **changes}
    weights = folder / payload["weights_file"]
    with safe_open(str(weights), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = dict(handle.metadata())
    recorded = {**json.loads(metadata["config"]), **EARLIER_TRAINING_FIELDS, **changes}
    metadata["config"] = json.dumps(recorded, indent=2, sort_keys=True)
    save_file(tensors, str(weights), metadata=metadata)
    payload["weights_sha256"] = mlio.file_sha256(weights)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))


@pytest.mark.parametrize(
    "config, earlier",
    [
        ({"method": "matryoshka"}, {}),
        ({"method": "matryoshka"}, {"method": "matryoshka_exact"}),  # the same function
        ({"method": "lora", "inference_scale": "paper"}, {"prefix_loss": False}),
        ({"method": "dylora", "inference_scale": "paper"}, {"dylora_update": "last"}),
    ],
)
def test_adapter_saved_by_an_earlier_version_loads_and_computes_the_same(
    tmp_path, input_ids, config, earlier
):
    model = trained_llama(**config)
    ml.save_adapter(model, tmp_path)
    write_as_earlier_version(tmp_path, **earlier)
    assert "prefix_loss" in json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = make_tiny_llama()
    ml.load_adapter(loaded, tmp_path)
    assert get_config(loaded) == get_config(model)
    want, got = all_rank_logits(model, input_ids), all_rank_logits(loaded, input_ids)
    for rank, logits in want.items():
        torch.testing.assert_close(got[rank], logits, atol=0, rtol=0)
