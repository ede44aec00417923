"""Splicing into every supported family, on small randomly initialised configs."""

import inspect

import pytest
import torch
import transformers as tf

from lorsa_surgery import Lorsa, LorsaConfig, LorsaSurgeryError
from lorsa_surgery.host.arch import arch_for
from lorsa_surgery.host.splicing import CACHE_KEYWORDS, cache_keyword, splice
from lorsa_surgery.host.arch import exact_copy

COMMON = dict(vocab_size=97, num_hidden_layers=3, max_position_embeddings=128)


def tiny(family: str, attn: str = "eager"):
    torch.manual_seed(0)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **COMMON)
    configs = {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "llama3-rope": lambda: tf.LlamaConfig(**llama_like, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "mistral": lambda: tf.MistralConfig(**llama_like, sliding_window=None),
        "mistral-sliding": lambda: tf.MistralConfig(**llama_like, sliding_window=4),  # shorter than the test inputs
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "qwen3": lambda: tf.Qwen3Config(**llama_like, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**llama_like, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                           attn_logit_softcapping=None, final_logit_softcapping=None),
        "gemma2-softcap": lambda: tf.Gemma2Config(**llama_like, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                                   attn_logit_softcapping=0.02, final_logit_softcapping=None),
        "gemma3": lambda: tf.Gemma3TextConfig(**llama_like, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                               layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "phi3": lambda: tf.Phi3Config(**llama_like, pad_token_id=0),
        "smollm3": lambda: tf.SmolLM3Config(**llama_like, no_rope_layers=[1, 0, 1], pad_token_id=0, bos_token_id=1, eos_token_id=2),  # LAYER has no rotary
        "gpt2": lambda: tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=3, n_head=4, n_positions=128),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, rotary_pct=0.25, **COMMON),
        "gptj": lambda: tf.GPTJConfig(vocab_size=97, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=128),
    }
    config = configs[family]()
    config._attn_implementation = attn
    if attn == "sdpa" and not tf.AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa:
        pytest.skip(f"transformers has no sdpa attention for {family}")
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    if family.startswith("gemma"):  # random Gemma norms start at zero gain-offset; make them non-trivial
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    return model


FAMILIES = ["llama", "llama3-rope", "mistral", "mistral-sliding", "qwen2", "qwen3", "gemma2", "gemma2-softcap", "gemma3",
            "phi3", "smollm3", "gpt2", "gpt_neox", "gptj"]
LAYER = 1


def sparse_module(model) -> Lorsa:
    """A sparse Lorsa (top-K of a quarter of the heads) that behaves differently from the original."""
    lorsa = exact_copy(model, LAYER)
    lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", lorsa.cfg.n_ov_heads // 4
    return lorsa


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@torch.no_grad()
def test_exact_mode_and_unsplice_are_bit_exact(family):
    model = tiny(family)
    ids = torch.randint(3, 97, (2, 10))
    base = model(ids).logits
    original_attention = getattr(arch_for(model).layer_list(model)[LAYER], arch_for(model).attention)
    handle = splice(model, {LAYER: sparse_module(model)}, mode="exact")
    assert torch.equal(model(ids).logits, base)
    handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # a no-op edit: the delta path runs, and adds zero
    assert torch.equal(model(ids).logits, base)
    handle.unsplice()
    assert getattr(arch_for(model).layer_list(model)[LAYER], arch_for(model).attention) is original_attention
    assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("space", ["hf", "processed"])
@torch.no_grad()
def test_from_attention_reproduces_logits(family, space):
    model = tiny(family)
    ids = torch.randint(3, 97, (2, 10))
    base = model(ids).logits
    if space == "processed" and arch_for(model).post_attention_norm:
        with pytest.raises(LorsaSurgeryError, match="post-attention norm"):
            exact_copy(model, LAYER, input_space=space)
        return
    with splice(model, {LAYER: exact_copy(model, LAYER, input_space=space)}):
        spliced = model(ids).logits
    assert (spliced - base).abs().max().item() <= 1e-4
    with splice(model, {LAYER: sparse_module(model)}):
        assert (model(ids).logits - base).abs().max().item() > 1e-3  # the sparse module really is in the path


@pytest.mark.parametrize("mode", ["replace", "exact"])
@torch.no_grad()
def test_greedy_generation_same_with_and_without_cache(family, mode):
    model = tiny(family)
    prompt = torch.randint(3, 97, (1, 7))
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain_logits = model(prompt).logits
    with splice(model, {LAYER: sparse_module(model)}, mode=mode) as handle:
        if mode == "exact":
            handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # the delta path, adding zero
            assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0), plain)
            # A real edit: every decode step now reads Lorsa's own keys and values from the exact-mode cache slot.
            handle[LAYER].hooks[:] = [lambda acts, ctx: acts * 3.0]
            assert (model(prompt).logits - plain_logits).abs().max() > 1e-4
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_left_padded_rows_equal_single_runs(family, attn):
    model = tiny(family, attn)
    prompts = [torch.randint(3, 97, (1, n)) for n in (8, 5)]
    T = 8
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - p.shape[1] :], mask[i, T - p.shape[1] :] = p[0], 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with splice(model, {LAYER: sparse_module(model)}):
        batch = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for i, p in enumerate(prompts):
            single = model(p).logits[0]
            assert (batch[i, T - p.shape[1] :] - single).abs().max().item() <= 1e-4


@torch.no_grad()
def test_beam_search_runs_in_both_modes():
    model = tiny("llama")
    prompt = torch.randint(3, 97, (1, 6))
    reference = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False)
    with splice(model, {LAYER: sparse_module(model)}, mode="exact") as handle:
        handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # the delta path, adding zero
        assert torch.equal(model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False), reference)
        handle[LAYER].hooks[:] = [lambda acts, ctx: acts * 3.0]  # beams reorder both caches of the slot
        cached = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with splice(model, {LAYER: sparse_module(model)}):
        cached = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_static_cache_fails_clearly():
    model = tiny("llama")
    with splice(model, {LAYER: sparse_module(model)}):
        with pytest.raises(LorsaSurgeryError, match="dynamic cache"):
            model.generate(torch.randint(3, 97, (1, 5)), max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_errors():
    model = tiny("llama")
    lorsa = sparse_module(model)
    with pytest.raises(LorsaSurgeryError, match="out of range"):
        splice(model, {7: lorsa})
    with pytest.raises(LorsaSurgeryError, match="mode must be"):
        splice(model, {1: lorsa}, mode="swap")
    with pytest.raises(LorsaSurgeryError, match="d_model=64, the model 32"):
        small = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, **COMMON))
        splice(small, {1: lorsa})
    handle = splice(model, {1: lorsa})
    with pytest.raises(LorsaSurgeryError, match="already has Lorsa"):
        splice(model, {2: lorsa})
    with pytest.raises(LorsaSurgeryError, match="carries no Lorsa"):
        handle[2]
    handle.unsplice()

    class Strange(torch.nn.Module):
        config = tf.PretrainedConfig()

    with pytest.raises(LorsaSurgeryError, match="Strange .* not a supported architecture"):
        splice(Strange(), {0: lorsa})


@torch.no_grad()
def test_processed_module_on_gemma_absorbs_post_attention_norm():
    """Processed-space Gemma targets are after the post-attention norm: the splice takes that norm over."""
    model = tiny("gemma2")
    ids = torch.randint(3, 97, (2, 10))
    base = model(ids).logits
    lorsa = sparse_module(model)
    lorsa.cfg.input_space = "processed"
    block = model.model.layers[LAYER]
    post_norm = block.post_attention_layernorm
    with splice(model, {LAYER: lorsa}, mode="exact") as handle:
        assert isinstance(block.post_attention_layernorm, torch.nn.Identity)
        handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # the delta path, added after the absorbed norm
        assert torch.equal(model(ids).logits, base)
    assert block.post_attention_layernorm is post_norm
    seen = {}
    with splice(model, {LAYER: lorsa}) as handle:
        grab_in = block.self_attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"]), with_kwargs=True)
        grab_out = block.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.update(out=out))
        model(ids)
        grab_in.remove()
        grab_out.remove()
        # What reaches the residual stream is Lorsa's output as it is: trained after the norm, it is not normed again.
        assert torch.allclose(seen["out"], handle[LAYER].lorsa(seen["x"]), atol=1e-5)
        assert (seen["out"] - post_norm(seen["out"])).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["replace", "exact"])
@torch.no_grad()
def test_splice_into_a_model_offloaded_by_accelerate(tmp_path, mode):
    """Layers offloaded to disk by Accelerate keep their hooks; the Lorsa module runs on the execution device."""
    from accelerate import dispatch_model

    model = tiny("llama")
    ids = torch.randint(3, 97, (1, 8))
    lorsa, exact = sparse_module(model), exact_copy(model, LAYER)
    edit = lambda acts, ctx: acts * 3.0  # noqa: E731 (so exact mode runs its delta path and Lorsa's cache slot)
    with splice(model, {LAYER: lorsa}, mode=mode) as handle:
        handle[LAYER].hooks.append(edit)
        expected = model(ids).logits
        expected_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    assert model.model.layers[LAYER].self_attn.q_proj.weight.device.type == "meta"
    copy = exact_copy(model, LAYER)  # read through the offload hook's weights
    assert model.model.layers[LAYER].self_attn.q_proj.weight.device.type == "meta"
    assert all(torch.equal(v, reference) for v, reference in zip(copy.state_dict().values(), exact.state_dict().values()))
    with splice(model, {LAYER: lorsa}, mode=mode) as handle:
        handle[LAYER].hooks.append(edit)
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected_tokens)


def test_the_module_runs_on_the_execution_device_of_its_layer():
    """Accelerate's hook names the device a layer runs on; the Lorsa module follows it, not the layer's weights.
    Without a second real device here, the meta device stands in for one."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny("llama")
    add_hook_to_module(model.model.layers[LAYER].self_attn, AlignDevicesHook(execution_device="meta"))
    with splice(model, {LAYER: sparse_module(model)}) as handle:
        assert handle[LAYER].lorsa.W_O.device.type == "meta" and model.model.layers[LAYER].self_attn.original.q_proj.weight.device.type == "cpu"


def test_the_cache_keyword_is_read_from_the_signature():
    def attention(name: str) -> torch.nn.Module:
        scope: dict = {}
        exec(f"def forward(self, hidden_states, attention_mask=None, {name}=None, **kwargs): pass", scope)
        return type("Attention", (torch.nn.Module,), {"forward": scope["forward"]})()

    assert [cache_keyword(attention(name)) for name in CACHE_KEYWORDS] == list(CACHE_KEYWORDS)
    assert cache_keyword(attention("something_else")) is None
    model = tiny("llama")
    with splice(model, {LAYER: sparse_module(model)}) as handle:
        site = handle[LAYER]
        # The installed transformers names it as it does: the site found that name, whichever release this is.
        assert site.cache_keyword in inspect.signature(site.original.forward).parameters
        with pytest.raises(LorsaSurgeryError, match=f"asked to use a cache but received none under '{site.cache_keyword}'"):
            site(torch.randn(1, 3, 64), attention_mask=None, position_ids=torch.arange(3)[None], use_cache=True)


@torch.no_grad()
def test_a_bad_entry_leaves_the_model_as_it_was():
    model = tiny("llama")
    ids = torch.randint(3, 97, (2, 10))
    base = model(ids).logits
    attentions = [layer.self_attn for layer in model.model.layers]
    good = sparse_module(model)
    good.cfg.host_layer = None  # it goes to layer 0 here
    narrow = Lorsa(LorsaConfig(d_model=32, n_qk_heads=2, d_qk_head=8, n_ov_heads=8, top_k=2))
    for bad in ({0: good, 2: narrow}, {0: good, 5: good}, {0: good, 1: "a path"}, {0: good, "1": good}):
        with pytest.raises(LorsaSurgeryError):
            splice(model, bad)
        assert all(layer.self_attn is a for layer, a in zip(model.model.layers, attentions))
        assert not hasattr(model, "_lorsa") and torch.equal(model(ids).logits, base)


def test_an_already_spliced_layer_is_refused():
    model = tiny("llama")
    handle = splice(model, {LAYER: sparse_module(model)})
    del model._lorsa  # the handle was dropped, the layer is still spliced
    with pytest.raises(LorsaSurgeryError, match=f"Layer {LAYER} already carries a Lorsa module"):
        splice(model, {LAYER: sparse_module(model)})
    with pytest.raises(LorsaSurgeryError, match="No Lorsa modules"):
        splice(model, {})
    handle.unsplice()
    assert type(model.model.layers[LAYER].self_attn).__name__ == "LlamaAttention"


@torch.no_grad()
def test_a_multimodal_model_splices_into_its_text_layers():
    """Gemma 3's multimodal class keeps its text layers at model.language_model.layers: they are found there, and
    the exact copy of one reproduces the logits of a text prompt."""
    config = tf.Gemma3Config(
        text_config=dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                           patch_size=14),
        mm_tokens_per_image=4,
    )
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    ids = torch.randint(3, 97, (2, 10))
    base = model(ids).logits
    assert arch_for(model).site_names(1)["hf_module"] == "model.language_model.layers.1.self_attn"
    with splice(model, {1: exact_copy(model, 1)}) as handle:
        assert model.model.language_model.layers[1].self_attn is handle[1]
        assert (model(ids).logits - base).abs().max().item() <= 1e-4
    assert type(model.model.language_model.layers[1].self_attn).__name__ == "Gemma3Attention"
