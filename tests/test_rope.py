"""Rotary position from the host: every rope type transformers implements, on tiny random models, at positions past
the scaling threshold (16 positions; inputs of 40 tokens and more), so the scaling shapes every result."""

import dataclasses

import pytest
import torch
import transformers as tf

from lorsa_surgery import Lorsa, LorsaConfig, LorsaSurgeryError
from lorsa_surgery.analysis import families
from lorsa_surgery.analysis.families import detect
from lorsa_surgery.host.arch import exact_copy, from_host_subspaces, host_rotary
from lorsa_surgery.host.hooks import watch_attention
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.lorsa.formats import describe
from lorsa_surgery.multihop import positional
from lorsa_surgery.training import trainer as training
from test_splice import LAYER, sparse_module
from test_training import host, one_thread, text, tiny_config  # noqa: F401  (fixtures)

THRESHOLD = 16
"""Where each scaled rope type starts to scale (original context, or dynamic's max_position_embeddings)."""
PROMPT = 40

LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
ROPES = {
    "default": lambda: tf.LlamaConfig(**LLAMA_LIKE, max_position_embeddings=128),
    "linear": lambda: tf.LlamaConfig(**LLAMA_LIKE, max_position_embeddings=128, rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "dynamic": lambda: tf.Qwen2Config(**LLAMA_LIKE, max_position_embeddings=THRESHOLD, rope_parameters={
        "rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
    "yarn": lambda: tf.Qwen2Config(**LLAMA_LIKE, max_position_embeddings=4 * THRESHOLD, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": THRESHOLD, "rope_theta": 10000.0}),
    # Partial rotary too: 8 of each head's 16 dimensions rotate, so 4 factors per list.
    "longrope": lambda: tf.Phi3Config(**LLAMA_LIKE, max_position_embeddings=4 * THRESHOLD,
                                      original_max_position_embeddings=THRESHOLD, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 4.0, 8.0],
        "original_max_position_embeddings": THRESHOLD, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "llama3": lambda: tf.LlamaConfig(**LLAMA_LIKE, max_position_embeddings=128, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": THRESHOLD}),
    # Gemma 3's rotary differs by layer type, as in the released models: linear on global layers (LAYER), default on
    # local ones.
    "gemma3-linear": lambda: tf.Gemma3TextConfig(
        **LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=24, sliding_window=5, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}),
}
SCALED = [name for name in ROPES if name != "default"]
OWN = ["default", "llama3"]  # what a module's own rotary computes
HOST = [name for name in ROPES if name not in OWN]


def tiny(rope: str, vocab_size: int = 97):
    torch.manual_seed(0)
    config = ROPES[rope]()
    config.vocab_size = vocab_size
    config._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(config).eval()


def captured(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Layer LAYER's attention input, output and the (cos, sin) the host passed it."""
    with watch_attention(model, [LAYER], stop=True) as calls:
        model(ids, use_cache=False)
    call = calls[LAYER]
    return call.hidden_states, call.result, call.kwargs["position_embeddings"]


def positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)


@pytest.fixture(scope="module", params=list(ROPES))
def rope(request):
    return request.param


@torch.no_grad()
def test_exact_mode_is_bit_equal(rope):
    model = tiny(rope)
    ids = torch.randint(3, 97, (2, PROMPT))
    base = model(ids).logits
    with splice(model, {LAYER: sparse_module(model)}, mode="exact") as handle:
        assert torch.equal(model(ids).logits, base)
        handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # the delta path runs, and adds zero
        assert torch.equal(model(ids).logits, base)


@torch.no_grad()
def test_replace_with_the_exact_copy_reproduces_the_logits(rope):
    model = tiny(rope)
    ids = torch.randint(3, 97, (2, PROMPT))
    base = model(ids).logits
    with splice(model, {LAYER: exact_copy(model, LAYER)}):
        error = (model(ids).logits - base).abs().max()
    assert error <= 3e-5 * base.abs().max(), error


@pytest.mark.parametrize("mode", ["replace", "exact"])
@torch.no_grad()
def test_cached_generation_equals_uncached(rope, mode):
    if rope == "dynamic":
        pytest.skip("dynamic rope rescales every key when the sequence grows, cached keys keep their old angles: "
                    "transformers' own cached run differs from its uncached one (test_dynamic_rope_...)")
    model = tiny(rope)
    prompt = torch.randint(3, 97, (1, PROMPT))
    with splice(model, {LAYER: sparse_module(model)}, mode=mode) as handle:
        if mode == "exact":  # a real edit: every decode step reads Lorsa's own cached keys
            handle[LAYER].hooks.append(lambda acts, ctx: acts * 3.0)
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def _incremental_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of `ids` run as a prefill of `prefill` tokens, then one token at a time through the KV cache."""
    cache = tf.DynamicCache(config=model.config)
    steps = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1)


@torch.no_grad()
def test_dynamic_rope_cached_run_follows_the_host_step_by_step():
    """Dynamic rope recomputes its frequencies as the sequence grows past the threshold, while cached keys keep the
    angles they were given; so transformers' cached run is not its uncached one, and the spliced model is held to
    the host's cached run instead: token by token, on the same tokens, from the same (fresh) rotary state."""
    ids = torch.randint(3, 97, (1, PROMPT + 12))
    original = _incremental_logits(tiny("dynamic"), ids, PROMPT)
    model = tiny("dynamic")
    with splice(model, {LAYER: exact_copy(model, LAYER)}):
        spliced = _incremental_logits(model, ids, PROMPT)
    assert (spliced - original).abs().max() <= 3e-5 * original.abs().max()


@pytest.mark.parametrize("rope", SCALED)
@torch.no_grad()
def test_the_scaling_matters(rope):
    """The host's queries differ from those of the module's unscaled rotary, so the tests above would catch a module
    that ignored the host's cos and sin."""
    model = tiny(rope)
    ids = torch.randint(3, 97, (1, PROMPT))
    x, _, cos_sin = captured(model, ids)
    exact = exact_copy(model, LAYER)
    unscaled = Lorsa(dataclasses.replace(exact.cfg, rope_type="default", use_NTK_by_parts_rope=False))
    unscaled.load_state_dict(exact.state_dict())
    q_host, q_unscaled = exact.project(x, positions(ids), cos_sin)[0], unscaled.project(x, positions(ids))[0]
    assert (q_host - q_unscaled).abs().max() > 0.05 * q_unscaled.abs().max()


@pytest.mark.parametrize("rope", OWN)
@torch.no_grad()
def test_own_rotary_agrees_with_the_host(rope):
    model = tiny(rope)
    ids = torch.randint(3, 97, (1, PROMPT))
    x, _, cos_sin = captured(model, ids)
    exact = exact_copy(model, LAYER)
    assert host_rotary(model, LAYER, positions(ids)) is None  # nothing to fetch: the module computes it
    for own, hosts in zip(exact.project(x, positions(ids)), exact.project(x, positions(ids), cos_sin)):
        torch.testing.assert_close(own, hosts, rtol=0, atol=1e-5 * hosts.abs().max().item())


@pytest.mark.parametrize("rope", HOST)
@torch.no_grad()
def test_host_rotary_is_what_the_host_passes_and_the_module_needs_it(rope):
    model = tiny(rope)
    ids = torch.randint(3, 97, (2, PROMPT))
    x, y, cos_sin = captured(model, ids)
    fetched = host_rotary(model, LAYER, positions(ids))
    assert all(torch.equal(a, b.expand_as(a)) for a, b in zip(fetched, cos_sin))
    exact = exact_copy(model, LAYER)
    with pytest.raises(LorsaSurgeryError, match=f"rotary of type '{exact.cfg.rope_type}' is computed by the host"):
        exact(x)
    # Outside the host, given the host's cos and sin, the exact copy reproduces the layer.
    assert (exact(x, rotary=fetched) - y).abs().max() <= 1e-5 * y.abs().max()
    full = from_host_subspaces(model, LAYER, exact.cfg.n_qk_heads, exact.cfg.n_ov_heads, x)  # measures on x
    assert (full(x, rotary=fetched) - y).abs().max() <= 1e-5 * y.abs().max()


def test_rope_type_is_saved_and_old_configs_load_as_default(tmp_path):
    model = tiny("yarn")
    exact = exact_copy(model, LAYER)
    loaded = Lorsa.from_pretrained(exact.save_pretrained(tmp_path / "yarn"))
    assert loaded.cfg.rope_type == "yarn" and describe(loaded)["rotary"]["type"] == "yarn (cos and sin from the host)"
    old = exact.cfg.to_dict()
    del old["rope_type"]
    assert LorsaConfig.from_dict(old).rope_type == "default"
    with pytest.raises(LorsaSurgeryError, match="rope_type"):
        LorsaConfig.from_dict({**old, "rope_type": 3})


def test_training_feeds_the_host_rotary(host, text, tmp_path, one_thread):  # noqa: F811
    """A yarn host: every batch carries the host's cos and sin, and a short run trains and splices."""
    tokenizer = tf.AutoTokenizer.from_pretrained(host)
    model = tiny("yarn", vocab_size=len(tokenizer))
    ids = torch.randint(4, len(tokenizer), (2, PROMPT))
    source = training.ActivationSource(model, (LAYER,), ids, torch.ones_like(ids))
    batch = source.get([0, 1])[LAYER]
    _, _, cos_sin = captured(model, ids)
    assert all(torch.equal(a, b[:1]) for a, b in zip(batch["rotary"], cos_sin))
    config = tiny_config(host, text, tmp_path / "run", context=PROMPT, tokens=4 * PROMPT * 4, init="host")
    modules = training.train(config, model=model, tokenizer=tokenizer)
    assert modules[LAYER].cfg.rope_type == "yarn"
    with torch.no_grad(), splice(model, modules):
        assert torch.isfinite(model(ids).logits).all()


@torch.no_grad()
def test_analysis_on_captured_inputs_feeds_the_host_rotary(host, monkeypatch):  # noqa: F811
    """Positional head scores and head families run modules on captured attention inputs: on a yarn host the
    exact copy's QK heads score as the heads they copy, and family scores come out for both kinds of head."""
    model = tiny("yarn")
    ids = torch.randint(3, 97, (2, PROMPT))
    exact = exact_copy(model, LAYER)
    mhsa = positional.head_scores(model, ids, layers=[LAYER], progress=False)
    qk = positional.head_scores(model, ids, lorsa={LAYER: exact}, progress=False)
    torch.testing.assert_close(qk.positional, mhsa.positional, atol=1e-5, rtol=0)
    torch.testing.assert_close(qk.symbolic, mhsa.symbolic, atol=1e-5, rtol=0)
    tokenizer = tf.AutoTokenizer.from_pretrained(host)
    monkeypatch.setattr(families, "word_tokens", lambda tokenizer: list(range(4, len(tokenizer))))  # no real words
    model = tiny("yarn", vocab_size=len(tokenizer))
    for module in (None, exact_copy(model, LAYER)):
        scores = detect(model, tokenizer, LAYER, module, ["previous_token"], n_prompts=2)["previous_token"].scores
        assert scores.numel() and torch.isfinite(scores).all()


def test_a_host_without_a_rotary_module_is_refused_in_one_sentence():
    model = tiny("yarn")
    del model.model.rotary_emb
    with pytest.raises(LorsaSurgeryError, match="no rotary_emb beside its layers, so its 'yarn' rotary"):
        host_rotary(model, LAYER, torch.arange(PROMPT)[None])
