"""Slicing a PEFT export: the rank-r slice of a rank-R export is the rank-r export, file for file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    make_tiny_gpt2,
    make_tiny_llama,
    run_main,
    trained_llama,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

import matryoshka_lora as ml
from matryoshka_lora import export as mlx
from matryoshka_lora.eval.sweep import SweepResult
from matryoshka_lora.model import adapter_layers, get_config
from matryoshka_lora.svd import svd_rebase_

R = 8
SWEEP = SweepResult((1, 2, 4, 8), {"loss": {"trained": {1: 3.0, 2: 2.5, 4: 2.0, 8: 1.5}}})
CARD = {"sweep": SWEEP, "tags": ["gsm8k"]}

# (adapter config, scale encoding): every case whose slice must be exact
EXACT = {
    "matryoshka-trained-baked": ({"method": "matryoshka", "inference_scale": "trained"}, "baked"),
    "matryoshka-trained-rank-baked": (
        {"method": "matryoshka", "inference_scale": "trained", "scaling": "rank", "alpha": 4.0},
        "baked",
    ),
    "lora-trained-baked": (
        {"method": "lora", "inference_scale": "trained", "scaling": "rank", "alpha": 16.0},
        "baked",
    ),
    "matryoshka-paper-none-baked": (
        {"method": "matryoshka", "inference_scale": "paper", "scaling": "none", "alpha": 0.5},
        "baked",
    ),
    "matryoshka-paper-sqrt-alpha": (
        {"method": "matryoshka", "inference_scale": "paper", "scaling": "sqrt"},
        "alpha",
    ),
    "dylora-rank-alpha": ({"method": "dylora", "scaling": "rank", "alpha": 3.0}, "alpha"),
    "lora-paper-rank-alpha": (
        {"method": "lora", "inference_scale": "paper", "scaling": "rank", "alpha": 16.0},
        "alpha",
    ),
}


def trained(make=make_tiny_llama, targets=LLAMA_TARGETS, **config):
    """A tiny model with a rank-8 nested adapter whose B is random (as after training)."""
    fields = {"r": R, "train_ranks": (1, 2, 4, 8), **config}
    return trained_llama(seed=5, scale=0.1, make=make, targets=targets, **fields)


def safetensors_parts(path) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file. The header is compared parsed: safetensors
    writes its metadata entries in hash-map order, which differs from run to run."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def assert_same_folder(got, want) -> None:
    """``got`` holds the same files as ``want``: tensor for tensor (bitwise), the same
    safetensors header and metadata, the same adapter_config.json and model card."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    weights = "adapter_model.safetensors"
    with safe_open(got / weights, "pt") as g, safe_open(want / weights, "pt") as w:
        assert sorted(g.keys()) == sorted(w.keys())
        for key in w.keys():
            a, b = g.get_tensor(key), w.get_tensor(key)
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b), key
        assert g.metadata() == w.metadata()
    assert safetensors_parts(got / weights) == safetensors_parts(want / weights)
    config = "adapter_config.json"
    assert json.loads((got / config).read_text()) == json.loads((want / config).read_text())
    for name in (config, "README.md"):
        if (want / name).exists():
            assert (got / name).read_bytes() == (want / name).read_bytes(), name


def ours(model, ids, rank):
    with torch.no_grad(), ml.at_rank(model, rank):
        return model(ids).logits


def peft_logits(make, folder, ids):
    with torch.no_grad():
        return PeftModel.from_pretrained(make(), folder)(ids).logits


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- the slice is the export
@pytest.mark.parametrize("case", list(EXACT))
def test_slice_of_the_rank_R_export_is_the_rank_r_export_file_for_file(tmp_path, case):
    config, encoding = EXACT[case]
    model = trained(**config)
    mlx.export_peft(model, R, tmp_path / "full", encoding, **CARD)
    for r in (1, 3, 4, 7, R):
        mlx.export_peft(model, r, tmp_path / f"export-{r}", encoding, **CARD)
        out = mlx.slice_peft_adapter(tmp_path / "full", tmp_path / f"slice-{r}", r)
        assert out == tmp_path / f"slice-{r}"
        assert_same_folder(out, tmp_path / f"export-{r}")
    card = (tmp_path / "slice-4" / "README.md").read_text()
    assert "| **4** (this folder) |" in card and "| **8** (this folder) |" not in card


def test_slice_of_a_slice_is_the_export(tmp_path):
    model = trained(method="matryoshka", inference_scale="trained")
    mlx.export_peft(model, R, tmp_path / "full")
    mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "r6", 6)
    mlx.slice_peft_adapter(tmp_path / "r6", tmp_path / "r2", 2)
    mlx.export_peft(model, 2, tmp_path / "export-2")
    assert_same_folder(tmp_path / "r2", tmp_path / "export-2")


def test_svd_rebased_lora_slices_to_its_export(tmp_path):
    """The default path: a LoRA re-based on the SVD of its update deploys its prefixes at
    the trained scale, so the rank-R export holds every best rank-r approximation."""
    model = trained(method="lora", inference_scale="paper", scaling="rank", alpha=16.0)
    svd_rebase_(model)
    assert get_config(model).inference_scale == "trained"
    mlx.export_peft(model, R, tmp_path / "full")
    for r in (2, 5):
        mlx.export_peft(model, r, tmp_path / f"export-{r}")
        mlx.slice_peft_adapter(tmp_path / "full", tmp_path / f"slice-{r}", r)
        assert_same_folder(tmp_path / f"slice-{r}", tmp_path / f"export-{r}")


def test_alpha_encoding_recomputes_lora_alpha_in_the_adapters_precision(tmp_path):
    """c_3 = 1/3 is written as fp32(1/3) * 3 by an fp32 adapter and as fp64(1/3) * 3 by an
    fp64 one; the slice finds which from the folder's own lora_alpha."""
    alphas = {}
    for dtype in (torch.float32, torch.float64):
        model = trained(
            make=lambda d=dtype: make_tiny_llama(dtype=d),
            method="lora",
            inference_scale="paper",
            scaling="rank",
            alpha=1.0,
            adapter_dtype=None,  # the adapter follows the base: fp64 factors, fp64 P
        )
        assert next(iter(adapter_layers(model).values())).lora_A.dtype == dtype
        folder = tmp_path / str(dtype)
        mlx.export_peft(model, R, folder / "full", "alpha", model_card=False)
        mlx.export_peft(model, 3, folder / "export", "alpha", model_card=False)
        mlx.slice_peft_adapter(folder / "full", folder / "slice", 3)
        assert_same_folder(folder / "slice", folder / "export")
        alphas[dtype] = json.loads((folder / "slice" / "adapter_config.json").read_text())
    assert alphas[torch.float32]["lora_alpha"] != alphas[torch.float64]["lora_alpha"]


def test_per_module_rank_export_slices_to_the_uniform_export(tmp_path):
    model = trained(method="matryoshka", inference_scale="trained")
    names = list(adapter_layers(model))
    ranks = {n: 8 for n in names} | {names[3]: 4, names[5]: 6}
    mlx.export_peft(model, ranks, tmp_path / "mixed")
    assert json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())["rank_pattern"]
    mlx.slice_peft_adapter(tmp_path / "mixed", tmp_path / "slice", 3)
    mlx.export_peft(model, 3, tmp_path / "export")
    assert_same_folder(tmp_path / "slice", tmp_path / "export")
    with pytest.raises(ValueError, match=rf"smallest 4 \({names[3]}\)"):
        mlx.slice_peft_adapter(tmp_path / "mixed", tmp_path / "r5", 5)


# ---------------------------------------------------------------------------- vanilla PEFT
@pytest.mark.parametrize(
    "arch,config,encoding,rank",
    [
        ("llama", {"method": "matryoshka", "inference_scale": "trained"}, "baked", 3),
        ("llama", {"method": "lora", "inference_scale": "paper", "scaling": "sqrt"}, "alpha", 2),
        ("gpt2", {"method": "matryoshka", "inference_scale": "trained"}, "baked", 4),
    ],
)
def test_vanilla_peft_loads_the_slice_with_our_logits(
    tmp_path, input_ids, arch, config, encoding, rank
):
    make, targets = {
        "llama": (make_tiny_llama, LLAMA_TARGETS),
        "gpt2": (make_tiny_gpt2, GPT2_TARGETS),
    }[arch]
    model = trained(make, targets, **config)
    mlx.export_peft(model, R, tmp_path / "full", encoding)
    mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "slice", rank)
    want = ours(model, input_ids, rank)
    assert not torch.allclose(want, ours(model, input_ids, R), atol=1e-4)  # the rank matters
    torch.testing.assert_close(
        peft_logits(make, tmp_path / "slice", input_ids), want, atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------------- refused sources
@pytest.mark.parametrize(
    "config",
    [
        {"method": "matryoshka", "inference_scale": "paper", "scaling": "sqrt"},
        {"method": "dylora", "scaling": "rank"},
    ],
)
def test_baked_export_of_a_rank_dependent_scale_is_refused(tmp_path, config):
    model = trained(**config)
    mlx.export_peft(model, R, tmp_path / "full")
    mlx.export_peft(model, 4, tmp_path / "export-4")
    # the maths behind the refusal: the rank-4 export's B is not the first 4 columns of the
    # rank-8 export's B (s(4) against s(8)), while A is
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_{}.weight"
    with safe_open(tmp_path / "full/adapter_model.safetensors", "pt") as full:
        with safe_open(tmp_path / "export-4/adapter_model.safetensors", "pt") as four:
            assert torch.equal(
                full.get_tensor(key.format("A"))[:4], four.get_tensor(key.format("A"))
            )
            assert not torch.equal(
                full.get_tensor(key.format("B"))[:, :4], four.get_tensor(key.format("B"))
            )
    with pytest.raises(ValueError, match="scale_encoding='alpha'"):
        mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "slice", 4)
    assert not (tmp_path / "slice").exists()
    mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "same", R)  # the whole prefix is exact


@pytest.mark.parametrize("rank", [0, R + 1, 2.5, True, "4"])
def test_rank_outside_1_to_R_is_refused(tmp_path, rank):
    mlx.export_peft(trained(), R, tmp_path / "full")
    with pytest.raises(ValueError, match="rank"):
        mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "slice", rank)
    assert not (tmp_path / "slice").exists()


def test_folders_that_are_not_a_peft_lora_export_are_refused(tmp_path):
    model = trained()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a PEFT folder"):
        mlx.slice_peft_adapter(tmp_path / "empty", tmp_path / "out", 2)
    with pytest.raises(ValueError, match="not a folder"):
        mlx.slice_peft_adapter(tmp_path / "missing", tmp_path / "out", 2)
    mlx.export_peft(model, None, tmp_path / "multi", ranks=[4, 8])
    with pytest.raises(ValueError, match="multi-rank export.*rank-4, rank-8"):
        mlx.slice_peft_adapter(tmp_path / "multi", tmp_path / "out", 2)
    ml.save_adapter(model, tmp_path / "native")  # our own format, not PEFT's
    with pytest.raises(ValueError, match="PEFT LoRA"):
        mlx.slice_peft_adapter(tmp_path / "native", tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()


def test_a_lora_trained_elsewhere_is_refused(tmp_path):
    peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=8, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "vanilla")
    with pytest.raises(ValueError, match="not written by matryoshka-lora.*no nested order"):
        mlx.slice_peft_adapter(tmp_path / "vanilla", tmp_path / "out", 2)


@pytest.mark.parametrize("encoding", ["baked", "alpha"])
def test_an_edited_lora_alpha_is_refused(tmp_path, encoding):
    mlx.export_peft(trained(method="lora", inference_scale="paper"), R, tmp_path / "full", encoding)
    path = tmp_path / "full" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    with pytest.raises(ValueError, match="edited"):
        mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "out", 2)


def test_a_pickle_beside_the_safetensors_is_refused(tmp_path):
    mlx.export_peft(trained(), R, tmp_path / "full")
    (tmp_path / "full" / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "out", 2)


def test_output_folder_rules(tmp_path):
    mlx.export_peft(trained(), R, tmp_path / "full")
    with pytest.raises(ValueError, match="source folder"):
        mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "full", 2, overwrite=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="overwrite"):
        mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "busy", 2)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "busy", 2, overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists()
    assert json.loads((tmp_path / "busy" / "adapter_config.json").read_text())["r"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "full"]  # no temporaries left


def test_other_files_are_carried_and_a_foreign_readme_is_kept(tmp_path):
    mlx.export_peft(trained(), R, tmp_path / "full", model_card=False)
    (tmp_path / "full" / "README.md").write_text("# my adapter\n")
    (tmp_path / "full" / "training_args.json").write_text('{"lr": 0.002}\n')
    (tmp_path / "full" / "logs").mkdir()
    (tmp_path / "full" / "logs" / "log.jsonl").write_text("{}\n")
    mlx.slice_peft_adapter(tmp_path / "full", tmp_path / "out", 2)
    for name in ("README.md", "training_args.json", "logs/log.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


# ---------------------------------------------------------------------------- command line
def test_slice_command_writes_the_export(tmp_path, capsys):
    model = trained()
    mlx.export_peft(model, R, tmp_path / "full")
    mlx.export_peft(model, 3, tmp_path / "export")
    code, out, err = run_main(
        capsys, "slice", tmp_path / "full", "--rank", 3, "--output-dir", tmp_path / "s"
    )
    assert code == 0, err
    assert "--max-lora-rank 8" in out
    assert_same_folder(tmp_path / "s", tmp_path / "export")
    code, _, err = run_main(capsys, "slice", tmp_path / "full", "--output-dir", tmp_path / "t")
    assert code == 2 and "--rank is required" in err
    code, _, err = run_main(
        capsys, "slice", tmp_path / "full", "--rank", 9, "--output-dir", tmp_path / "t"
    )
    assert code == 2 and "out of range" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_main(capsys, "slice", "--help")
    assert code == 0 and all(o in out for o in ("--rank", "--output-dir", "--overwrite"))
