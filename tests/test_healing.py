"""PEFT with spliced models: base-model adapters on a splice, healing, and healed models saved, reloaded and pushed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model

import lorsa_surgery as ls
from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.cli import main
from lorsa_surgery.training.healing import original_model
from test_publish import IDS, _tokenizer
from test_splice import LAYER, sparse_module, tiny

ROOT = Path(__file__).resolve().parent.parent


def base_adapter(folder: Path) -> tuple[torch.nn.Module, Path]:
    """A LoRA adapter made with PEFT for tiny("llama") (random, so it changes the output), saved as PEFT saves one."""
    peft_model = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                          init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return peft_model, folder


@torch.no_grad()
def test_a_base_model_adapter_loads_onto_a_spliced_model(tmp_path):
    peft_model, folder = base_adapter(tmp_path / "adapter")
    expected, plain = peft_model(IDS).logits, tiny("llama")(IDS).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the model

    model = tiny("llama")
    handle = ls.splice(model, {LAYER: sparse_module(model)}, mode="exact")
    handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # the delta path runs too
    report = ls.load_adapter(handle, folder)
    assert report.skipped == [] and len(report.applied) == 9  # 3 layers x (q, v, down), q and v of layer 1 on the original
    assert (model(IDS).logits - expected).abs().max() <= 1e-5
    handle.unsplice()
    assert not [n for n, _ in model.named_modules() if "lora" in n] and torch.equal(model(IDS).logits, plain)

    model = tiny("llama")
    handle = ls.splice(model, {LAYER: sparse_module(model)})
    report = ls.load_adapter(handle, folder)
    assert report.skipped == [f"model.layers.{LAYER}.self_attn.q_proj", f"model.layers.{LAYER}.self_attn.v_proj"]
    assert len(report.applied) == 7
    with pytest.raises(LorsaSurgeryError, match="already carries a LoRA adapter"):
        ls.load_adapter(handle, folder)
    handle.unsplice()
    exact = ls.splice(model, {LAYER: sparse_module(model)}, mode="exact")
    with pytest.raises(LorsaSurgeryError, match="exact mode"):
        ls.heal(exact, _tokenizer(), ls.HealConfig(tokens=128, batch_size=1, context=8, eval_tokens=8))


def _words(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(2, 95, (n,), generator=g))


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text(_words(6000, 0))
    return path


def opinionated() -> torch.nn.Module:
    """tiny("llama") with sharp next-token distributions (a random model's are nearly flat, which any splice keeps),
    in sdpa attention, as transformers loads it back."""
    model = tiny("llama", "sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def healed(text: Path, mode: str = "replace", space: str = "hf", **changes):
    model = opinionated()
    lorsa = ls.exact_copy(model, LAYER)
    lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", lorsa.cfg.n_ov_heads // 16
    if space == "processed":
        with torch.no_grad():
            model.model.layers[LAYER].input_layernorm.weight.uniform_(0.5, 2.0)
        lorsa = ls.exact_copy(model, LAYER, input_space="processed")
        lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", lorsa.cfg.n_ov_heads // 16
    lorsa.catalog = {5: {"label": "five"}}
    handle = ls.splice(model, {LAYER: lorsa}, mode=mode)
    handle.base = {"id": "ns/heal-base", "revision": None}
    settings = dict(tokens=4 * 32 * 30, batch_size=4, context=32, eval_tokens=512, texts=(str(text),), lr=3e-3, lorsa_lr=1e-3, lora_rank=4)
    report = ls.heal(handle, _tokenizer(), ls.HealConfig(**{**settings, **changes}), progress=False)
    return model, handle, report


@pytest.mark.slow
def test_healing_brings_the_spliced_model_back_and_keeps_its_heads(text, tmp_path):
    model, handle, report = healed(text)
    before, after = report["before"], report["after"]
    # Measured: KL 0.173 -> 0.094 nats/token, LM-loss gap +0.070 -> -0.010.
    assert after["kl"] < 0.7 * before["kl"] and abs(after["lm_loss_gap"]) < 0.5 * abs(before["lm_loss_gap"])
    lorsa = handle[LAYER].source
    assert lorsa.cfg.top_k == lorsa.cfg.n_ov_heads // 16 and lorsa.catalog == {5: {"label": "five"}}
    with ls.Recorder(handle, f"L{LAYER}.H0-{lorsa.cfg.n_ov_heads - 1}") as rec, torch.no_grad():
        model(IDS)
    assert int((rec.activations() != 0).sum(-1).max()) <= lorsa.cfg.top_k
    with torch.no_grad(), original_model(handle):  # the original is still there, untouched by healing
        assert torch.equal(model(IDS).logits, opinionated()(IDS).logits)
    # Interventions by name, and cached generation, on the healed model.
    with ls.InterventionSet([ls.Steer("L1:five", clamp=5.0, positions="generated")]).applied(handle):
        cached = model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_healing_is_measured_on_other_domains_and_can_train_on_the_models_own_text(text, tmp_path):
    model, handle, report = healed(text, tokens=4 * 32 * 3, sample_tokens=300, eval_tokens=128)
    assert "300 tokens sampled from the base model" in report["text"] and report["ood_text"].startswith("the built-in English prose")
    ood_before, ood_after = report["ood_before"], report["ood_after"]
    assert ood_before["tokens"] == ood_after["tokens"] > 500  # the whole prose sample, before and after
    assert ood_before["kl"] > 0 and ood_after["kl"] != ood_before["kl"]
    with pytest.raises(ls.LorsaSurgeryError, match="sample_tokens"):
        ls.HealConfig(sample_tokens=-1)


def test_healing_without_text_trains_on_as_much_sampled_text_as_it_reads(text):
    model, handle, report = healed(text, texts=(), tokens=4 * 32 * 2, eval_tokens=64)
    assert report["text"] == f"{4 * 32 * 2 + 64} tokens sampled from the base model"
    assert ls.HealConfig(texts=("notes.txt",)).sampled_tokens == 0 and ls.HealConfig(sample_tokens=7).sampled_tokens == 7


@pytest.mark.slow
def test_healing_a_processed_space_module_saves_what_it_learned(text, tmp_path):
    model, handle, report = healed(text, space="processed", lora_rank=0)
    assert report["trained"] == ["lorsa"] and report["after"]["kl"] < report["before"]["kl"]
    with torch.no_grad():
        expected = model(IDS).logits
    folder = ls.save_patched(handle, tmp_path / "healed")
    again = ls.Lorsa.from_pretrained(folder / f"layer_{LAYER}")
    assert again.cfg.input_space == "processed"
    handle.unsplice()
    with ls.splice(model, {LAYER: again}), torch.no_grad():
        assert (model(IDS).logits - expected).abs().max() <= 1e-5


_FRESH = f"""
import sys, torch
import lorsa_surgery as ls
torch.set_num_threads(int(sys.argv[2]))  # the parent's: the same summation order
with torch.no_grad():
    model = ls.load_patched(sys.argv[1])[0]
    torch.save(model(torch.tensor({IDS.tolist()})).logits, "fresh.pt")
"""


@pytest.mark.slow
def test_a_healed_model_saves_reloads_in_a_fresh_process_and_loads_by_hub_id(hub, text, tmp_path):
    base = tmp_path / "base"
    opinionated().save_pretrained(base)
    _tokenizer().save_pretrained(base)
    ls.push_folder(base, "ns/heal-base")
    model, handle, report = healed(text)
    assert report["after"]["kl"] < report["before"]["kl"]
    with torch.no_grad():
        expected = model(IDS).logits
    folder = ls.save_patched(handle, tmp_path / "healed", metrics={"healing": report}, repo_id="ns/healed")
    root = json.loads((folder / "lorsa_surgery.json").read_text())
    assert root["adapter"]["rank"] == 4 and (folder / "adapter" / "adapter_model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "## Adapter" in card and "## Healing" in card and f"{report['after']['kl']:.4f}" in card
    run = subprocess.run([sys.executable, "-c", _FRESH, str(folder), str(torch.get_num_threads())], cwd=tmp_path, env=os.environ, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (torch.load(tmp_path / "fresh.pt") - expected).abs().max() <= 1e-6
    ls.push_folder(folder, "ns/healed")
    again, _, again_handle = ls.load_patched("ns/healed")
    assert again_handle.adapter is not None
    with torch.no_grad():
        assert (again(IDS).logits - expected).abs().max() <= 1e-6


@pytest.mark.slow
def test_cli_heal(tmp_path, text):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "base")
    _tokenizer().save_pretrained(tmp_path / "base")
    host, _ = ls.load_model(str(tmp_path / "base"))
    with ls.splice(host, {LAYER: sparse_module(host)}) as handle:
        ls.save_patched(handle, tmp_path / "patched")
    args = ["heal", str(tmp_path / "patched"), "--out", str(tmp_path / "healed"), "--tokens", "1280", "--batch-size", "4",
            "--context", "32", "--eval-tokens", "256", "--text", str(text), "--lora-rank", "2", "--lr", "3e-3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "healed" / "heal.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 10 and all(r["kl"] >= 0 for r in log)
    healing = json.loads((tmp_path / "healed" / "lorsa_surgery.json").read_text())["metrics"]["healing"]
    assert f"{healing['after']['kl']:.4f}" in result.output and healing["trained"] == ["lora", "lorsa"]
    refused = CliRunner().invoke(main, [*args[:-4], "--lora-rank", "0", "--no-train-lorsa", "--overwrite"])
    assert refused.exit_code == 1 and "Nothing to train" in refused.output


@pytest.mark.slow
@torch.no_grad()
def test_an_adapter_trained_on_smollm2_loads_onto_the_spliced_model(smollm2, tmp_path):
    base, tok = smollm2
    import copy

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    ids = tok("The lighthouse keeper climbed the spiral stairs every evening at dusk.", return_tensors="pt").input_ids
    with torch.enable_grad():
        for _ in range(3):  # a few steps of ordinary fine-tuning on the base model
            peft_model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model(ids).logits
    assert (expected - base(ids).logits).abs().max() > 1e-3

    model = copy.deepcopy(base)
    handle = ls.splice(model, {3: ls.module_for(model, 3, "default")}, mode="exact")
    report = ls.load_adapter(handle, tmp_path / "adapter")
    assert report.skipped == [] and len(report.applied) == 4 * 30
    assert (model(ids).logits - expected).abs().max() <= 1e-5
    handle.unsplice()

    handle = ls.splice(model, {3: ls.module_for(model, 3, "default")})
    report = ls.load_adapter(handle, tmp_path / "adapter")
    assert report.skipped == [f"model.layers.3.self_attn.{n}" for n in ("o_proj", "q_proj", "v_proj")]
    handle.unsplice()


@pytest.mark.slow
def test_heal_example_runs_in_its_fast_mode(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "heal_smollm2.py"), "--fast", "--out", str(tmp_path / "healed")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out KL to the original" in done.stdout and (tmp_path / "healed" / "adapter").is_dir()
