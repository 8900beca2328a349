"""Hub-ready exports: model cards, sub-folder loading, and the upload call of ``--push-to-hub``.

There is no Hub here: the push test replaces only ``HfApi.create_repo`` /
``HfApi.upload_folder`` (the network calls) and checks the folder they are given,
which vanilla PEFT loads with our logits.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_llama, trained_llama
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel

import matryoshka_lora as ml
from matryoshka_lora import cli
from matryoshka_lora import export as mlx
from matryoshka_lora.eval import SweepResult
from matryoshka_lora.hub import hub_base_model, push_to_hub
from matryoshka_lora.model import adapter_layers

RANKS = (2, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def trained(**config):
    return trained_llama(seed=5, scale=0.1, **{"method": "matryoshka", **config})


def sweep() -> SweepResult:
    curve = {"trained": {1: 2.5, 2: 2.25, 4: 2.125, 8: 2.0}, "paper": {1: 2.75, 2: 2.5, 4: 2.25}}
    curve["paper"][8] = 2.0
    return SweepResult((1, 2, 4, 8), {"loss": curve}, base={"loss": 3.5})


def ours(model, ids, rank):
    with torch.no_grad(), ml.at_rank(model, rank):
        return model(ids).logits


def test_single_rank_export_has_a_hub_model_card(tmp_path):
    model = trained()
    out = mlx.export_peft(model, 4, tmp_path / "r4", sweep=sweep(), tags=["gsm8k"])
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == "tiny-llama"
    assert data["pipeline_tag"] == "text-generation"
    for tag in ("peft", "lora", "matryoshka-lora", "matryoshka", "gsm8k"):
        assert tag in data["tags"]
    assert "base_model:adapter:tiny-llama" in data["tags"]
    meta = data["matryoshka_lora"]
    assert meta["rank"] == 4 and meta["max_rank"] == 8 and meta["train_ranks"] == [1, 2, 4, 8]
    assert meta["scale_encoding"] == "baked"
    assert "rank **4**" in card.text
    assert "## Rank sweep" in card.text
    assert "| loss (trained) | loss (paper) |" in card.text
    assert "| 8 | 2 | 2 |" in card.text and "| base model (no adapter) | 3.5 | 3.5 |" in card.text
    assert "--max-lora-rank 8" in card.text  # rank 4 is served with vLLM's size 8
    # no sweep known: no table; the exported rank (4, not a sweep row) is still stated
    plain = ModelCard.load(mlx.export_peft(model, 3, tmp_path / "r3") / "README.md")
    assert (
        "## Rank sweep" not in plain.text and plain.data.to_dict()["matryoshka_lora"]["rank"] == 3
    )
    assert "(this folder)" not in plain.text


def test_per_module_rank_export_card_states_the_ranks(tmp_path):
    model = trained()
    ranks = {n: (2 if "mlp" in n else 4) for n in adapter_layers(model)}
    card = ModelCard.load(mlx.export_peft(model, ranks, tmp_path / "mixed") / "README.md")
    meta = card.data.to_dict()["matryoshka_lora"]
    assert meta["rank"] is None and meta["module_ranks"] == {"min": 2, "max": 4}
    assert "per-module ranks 2..4" in card.text and "rank_pattern" in card.text


def test_model_card_can_be_turned_off_and_local_bases_stay_out_of_the_metadata(tmp_path):
    model = trained()
    out = mlx.export_peft(model, 2, tmp_path / "bare", model_card=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (
        hub_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert hub_base_model("gpt2") == "gpt2"
    for local in ("/data/llama", "./model", "~/m", "a/b/c", None, ""):
        assert hub_base_model(local) is None


def test_multi_rank_export_subfolders_load_with_subfolder_and_adapter_name(tmp_path, input_ids):
    model = trained()
    out = mlx.export_peft(model, None, tmp_path / "multi", ranks=RANKS, sweep=sweep())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "rank-2", "rank-8"]
    root = ModelCard.load(out / "README.md")
    assert root.data.to_dict()["matryoshka_lora"]["ranks"] == list(RANKS)
    assert 'subfolder="rank-2"' in root.text and 'adapter_name="r8"' in root.text
    for r in RANKS:
        sub = ModelCard.load(out / f"rank-{r}" / "README.md")
        assert sub.data.to_dict()["matryoshka_lora"]["rank"] == r
        assert f"| **{r}** (this folder) |" in sub.text

    peft_model = PeftModel.from_pretrained(make_tiny_llama(), out, subfolder="rank-2")
    peft_model.load_adapter(out, adapter_name="r8", subfolder="rank-8")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, ours(model, input_ids, 2))
        peft_model.set_adapter("r8")
        torch.testing.assert_close(peft_model(input_ids).logits, ours(model, input_ids, 8))

    # transformers' own adapter loading (PeftAdapterMixin.load_adapter with a name); its
    # set_adapter / active_adapters need peft >= 0.22, so each rank goes onto its own base
    for r in RANKS:
        base = make_tiny_llama()
        base.load_adapter(str(out / f"rank-{r}"), adapter_name=f"r{r}")
        with torch.no_grad():
            torch.testing.assert_close(base(input_ids).logits, ours(model, input_ids, r))


def test_push_to_hub_uploads_the_written_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create", a, k)))
    monkeypatch.setattr(
        HfApi, "create_branch", lambda self, *a, **k: calls.append(("branch", a, k))
    )
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, **k: calls.append(("upload", (), k)) or "commit"
    )
    out = mlx.export_peft(trained(), 2, tmp_path / "r2")
    assert push_to_hub(out, "me/adapter", private=True, revision="v1") == "commit"
    assert [c[0] for c in calls] == ["create", "branch", "upload"]
    assert calls[0][1] == ("me/adapter",) and calls[0][2]["private"] is True
    assert calls[0][2]["exist_ok"] is True and calls[0][2]["repo_type"] == "model"
    assert calls[2][2]["folder_path"] == str(out) and calls[2][2]["repo_id"] == "me/adapter"
    assert calls[2][2]["revision"] == "v1"
    with pytest.raises(ValueError, match="no README.md"):
        push_to_hub(mlx.export_peft(trained(), 2, tmp_path / "bare", model_card=False), "me/x")


def test_cli_export_push_to_hub_sends_a_folder_vanilla_peft_loads(
    tmp_path, monkeypatch, capsys, input_ids
):
    model = trained()
    ml.save_adapter(model, tmp_path / "adapter")
    make_tiny_llama().save_pretrained(tmp_path / "base")
    make_char_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "sweep.json").write_text(sweep().to_json(), encoding="utf-8")
    sent = {}

    def upload_folder(self, **kwargs):
        sent.update(kwargs)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: sent.update(create=k))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "hub"
    code = cli.main(
        [
            "export",
            str(tmp_path / "adapter"),
            "--model",
            str(tmp_path / "base"),
            "--rank",
            "2,8",
            "--sweep",
            str(tmp_path / "sweep.json"),
            "--output-dir",
            str(out),
            "--push-to-hub",
            "me/tiny-matryoshka",
            "--private",
        ]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    assert "pushed" in printed and "--max-lora-rank 8" in printed
    assert sent["repo_id"] == "me/tiny-matryoshka" and sent["folder_path"] == str(out)
    assert sent["create"]["private"] is True
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "rank-2", "rank-8"]
    assert "## Rank sweep" in (out / "rank-2" / "README.md").read_text()
    for r in RANKS:  # the folder that was sent is a working adapter at each rank
        peft_model = PeftModel.from_pretrained(make_tiny_llama(), out, subfolder=f"rank-{r}")
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids).logits, ours(model, input_ids, r))


def test_cli_hub_flags_are_checked_before_any_work(tmp_path, capsys):
    ml.save_adapter(trained(), tmp_path / "adapter")
    cases = {
        ("--private",): "--private and --hub-revision go with --push-to-hub",
        ("--format", "merged", "--push-to-hub", "me/x"): "--push-to-hub applies to --format peft",
        ("--sweep", str(tmp_path / "missing.json")): "is not a file",
    }
    for extra, needle in cases.items():
        code = cli.main(
            ["export", str(tmp_path / "adapter"), "--rank", "2", "--output-dir", "x", *extra]
        )
        err = capsys.readouterr().err
        assert code != 0 and needle in err, err
    (tmp_path / "bad.json").write_text("{}")
    code = cli.main(
        [
            "export",
            str(tmp_path / "adapter"),
            "--rank",
            "2",
            "--output-dir",
            str(tmp_path / "o"),
            "--sweep",
            str(tmp_path / "bad.json"),
        ]
    )
    assert code != 0 and "not the sweep.json" in capsys.readouterr().err
