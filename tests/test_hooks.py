"""Hook points on spliced layers: names and shapes, run_with_cache and hooks, the fast path, gradients, plain PyTorch
hooks and nnsight, and the attention-slot capture; on tiny models, and on SmolLM2 with layers 3 and 18 spliced."""

import pytest
import torch

import lorsa_surgery as ls
from lorsa_surgery import Lorsa, LorsaSurgeryError
from lorsa_surgery.host.arch import exact_copy
from lorsa_surgery.host.hooks import EXACT_HOOK_NAMES, HOOK_NAMES, HookPoint, points, watch_attention
from lorsa_surgery.host.hooks import HeadContext
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.interventions.edits import Ablate, InterventionSet, Recorder, Steer
from test_splice import tiny

LAYERS = (0, 2)


def sparse(model, layer: int) -> Lorsa:
    lorsa = exact_copy(model, layer)
    lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", lorsa.cfg.n_ov_heads // 4
    return lorsa


def spliced(mode: str = "replace"):
    model = tiny("llama")
    return model, splice(model, {layer: sparse(model, layer) for layer in LAYERS}, mode=mode)


def ids(B: int = 2, T: int = 7) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 97, (B, T))


def zero_head(acts: torch.Tensor) -> torch.Tensor:
    acts = acts.clone()
    acts[..., 5] = 0
    return acts


def listening(handle) -> dict:
    """A hook that reads nothing at every point: the run then takes the route it takes when all are read (nnsight)."""
    return {name: lambda x: None for name in HOOK_NAMES + (EXACT_HOOK_NAMES if handle.mode == "exact" else ())}


# ---- names, shapes, reading --------------------------------------------------------------------------------------


def test_hook_points_are_named_submodules_of_every_spliced_layer():
    for mode, names in (("replace", HOOK_NAMES), ("exact", HOOK_NAMES + EXACT_HOOK_NAMES)):
        model, handle = spliced(mode)
        modules = dict(model.named_modules())
        for layer in LAYERS:
            assert {n for n in modules if n.startswith(f"model.layers.{layer}.self_attn.hook_")} == \
                {f"model.layers.{layer}.self_attn.{n}" for n in names}
        assert isinstance(model.model.layers[2].self_attn.hook_acts, HookPoint)
        assert list(points(handle, ["hook_acts", "L0.hook_in"])) == ["L0.hook_in", "L0.hook_acts", "L2.hook_acts"]
        assert not any(name.startswith("model.layers.1.self_attn.hook") for name in modules)  # not spliced
        assert not any("hook_" in key for key in model.state_dict())  # identities: nothing to save
    with pytest.raises(LorsaSurgeryError, match="exact-mode"):
        ls.run_with_cache(spliced("replace")[1], ids(), ["hook_error"])
    with pytest.raises(LorsaSurgeryError, match="No hook point 'L1.hook_acts'"):
        ls.run_with_cache(handle, ids(), ["L1.hook_acts"])


@torch.no_grad()
def test_the_cache_holds_every_point_in_the_documented_shape():
    model, handle = spliced("exact")
    cfg = handle[0].lorsa.cfg
    B, T, d = 2, 7, cfg.d_model
    cache = ls.run_with_cache(handle, ids(B, T))
    shapes = {"hook_in": (B, T, d), "hook_q": (B, T, cfg.n_qk_heads, cfg.d_qk_head), "hook_k": (B, T, cfg.n_qk_heads, cfg.d_qk_head),
              "hook_v": (B, T, cfg.n_ov_heads), "hook_pattern": (B, cfg.n_qk_heads, T, T), "hook_z": (B, T, cfg.n_ov_heads),
              "hook_acts": (B, T, cfg.n_ov_heads), "hook_out": (B, T, d), "hook_original": (B, T, d), "hook_error": (B, T, d)}
    assert cache.keys() == [f"L{layer}.{name}" for layer in LAYERS for name in HOOK_NAMES + EXACT_HOOK_NAMES]
    assert {name: tuple(cache[f"L2.{name}"].shape) for name in shapes} == shapes
    assert cache.logits.shape == (B, T, 97) and "L0.hook_acts" in cache and len(cache) == 20
    for layer in LAYERS:
        assert torch.allclose(cache[f"L{layer}.hook_out"] + cache[f"L{layer}.hook_error"], cache[f"L{layer}.hook_original"], atol=1e-5)
        assert torch.allclose(cache[f"L{layer}.hook_pattern"].sum(-1), torch.ones(B, cfg.n_qk_heads, T))
    with pytest.raises(KeyError, match="L1.hook_acts"):
        cache["L1.hook_acts"]


@torch.no_grad()
def test_cached_activations_equal_the_recorders():
    model, handle = spliced()
    n = handle[0].lorsa.cfg.n_ov_heads
    with Recorder(handle, [f"L{layer}.H0-{n - 1}" for layer in LAYERS]) as rec:
        model(ids())
    cache = ls.run_with_cache(handle, ids(), ["hook_acts"])
    recorded = rec.activations()
    for i, layer in enumerate(LAYERS):
        assert torch.equal(cache[f"L{layer}.hook_acts"], recorded[..., i * n : (i + 1) * n])
    # Reading them, the layer decodes all heads densely, not the K selected heads' rows: the same up to rounding.
    assert torch.allclose(cache.logits, model(ids()).logits, atol=1e-5)


@torch.no_grad()
def test_cached_pattern_equals_attention_pattern_and_mixes_the_values_into_z():
    model, handle = spliced()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    cache = ls.run_with_cache(handle, ids(), attention_mask=mask)
    for layer in LAYERS:
        site = handle[layer]
        g = site.lorsa.cfg.group_size
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        pattern = cache[f"L{layer}.hook_pattern"]
        expected = site.lorsa.attention_pattern(cache[f"L{layer}.hook_in"], position_ids, mask)
        real = mask.bool()[:, :, None] & mask.bool()[:, None, :]  # rows at padding attend anywhere; compare real ones
        assert torch.allclose(pattern.masked_fill(~real[:, None], 0), expected.masked_fill(~real[:, None], 0), atol=1e-6)
        v, z = cache[f"L{layer}.hook_v"], cache[f"L{layer}.hook_z"]
        mixed = torch.einsum("bhts,bshg->bthg", pattern, v.unflatten(-1, (-1, g))).flatten(-2)
        assert torch.allclose(mixed, z, atol=1e-5)


def test_gradients_reach_the_cached_activations():
    for mode, frozen in (("replace", False), ("replace", True), ("exact", False)):
        model, handle = spliced(mode)
        model.requires_grad_(not frozen)  # frozen: the cached tensors enter the run as leaves that need gradients
        cache = ls.run_with_cache(handle, ids(), ["hook_acts", "hook_z", "L2.hook_in"], grad=True)
        cache.logits[:, -1, 11].sum().backward()
        for name in ("L0.hook_acts", "L2.hook_acts", "L2.hook_in"):
            assert cache[name].grad is not None and cache[name].grad.abs().sum() > 0, (mode, frozen, name)
        acts, z = cache["L2.hook_acts"], cache["L2.hook_z"]
        if mode == "replace":  # only heads that fired reach the output: a silent head's z gets no gradient
            assert z.grad.abs().sum() > 0 and torch.all(z.grad[acts == 0] == 0)
        else:  # the output is the original's plus edits of the activations, so it does not depend on z
            assert torch.all(z.grad == 0)
    plain = ls.run_with_cache(handle, ids(), ["hook_acts"])
    assert not plain["L0.hook_acts"].requires_grad and plain.logits.grad_fn is None


# ---- editing -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_hooks_edit_as_ablate_and_steer_do():
    for mode in ("replace", "exact"):
        model, handle = spliced(mode)
        with InterventionSet([Ablate("L2.H5")]).applied(handle):
            ablated = model(ids()).logits
        with InterventionSet([Steer("L2.H5", clamp=3.0)]).applied(handle):
            steered = model(ids()).logits
        with ls.hooks(handle, {"L2.hook_acts": zero_head}):
            assert torch.equal(model(ids()).logits, ablated)
        with ls.hooks(handle, {"L2.hook_acts": lambda acts, ctx: acts.index_fill(-1, torch.tensor([5]), 3.0)}):
            assert torch.equal(model(ids()).logits, steered)

        def in_place(acts: torch.Tensor) -> None:
            acts[..., 5] = 3.0

        with ls.hooks(handle, {"L2.hook_acts": in_place}):  # an edit in place, returning nothing, counts too
            assert torch.equal(model(ids()).logits, steered)
        assert handle[2].hooks == [] and not handle[2].hook_acts.live


@torch.no_grad()
def test_reading_every_point_leaves_exact_mode_bit_exact_and_the_error_is_what_replace_mode_drops():
    model = tiny("llama")
    base = model(ids()).logits
    with splice(model, {layer: sparse(model, layer) for layer in LAYERS}, mode="replace"):
        replaced = model(ids()).logits
    with splice(model, {layer: sparse(model, layer) for layer in LAYERS}, mode="exact") as handle:
        assert torch.equal(ls.run_with_cache(handle, ids()).logits, base)
        with ls.hooks(handle, {"hook_error": torch.zeros_like}):
            assert torch.allclose(model(ids()).logits, replaced, atol=1e-5)
        with ls.hooks(handle, {"hook_out": lambda out: out * 0}):  # the reconstruction gone: the error is left
            with_error = ls.run_with_cache(handle, ids(), ["hook_error"])
        assert not torch.allclose(with_error.logits, base, atol=1e-3)


@torch.no_grad()
def test_edits_at_inner_points_flow_and_key_edits_enter_the_kv_cache():
    model, handle = spliced()
    with ls.hooks(handle, {"L0.hook_v": torch.zeros_like}):
        assert torch.all(ls.run_with_cache(handle, ids(), ["L0.hook_acts"])["L0.hook_acts"] == 0)

    def uniform(pattern: torch.Tensor) -> torch.Tensor:  # every key a query may see, alike
        return (pattern > 0).float() / (pattern > 0).sum(-1, keepdim=True)

    with ls.hooks(handle, {"L2.hook_pattern": uniform}):
        cache = ls.run_with_cache(handle, ids(), ["L2.hook_z", "L2.hook_v"])
    causal_mean = cache["L2.hook_v"].cumsum(1) / torch.arange(1, 8)[None, :, None]
    assert torch.allclose(cache["L2.hook_z"], causal_mean, atol=1e-5)
    prompt = ids(1, 5)
    for name in ("L2.hook_k", "L2.hook_q", "L0.hook_v"):
        with ls.hooks(handle, {name: lambda t: t * 3.0}):
            cached = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached), name


@torch.no_grad()
def test_hooks_during_generate_see_each_new_token_with_its_context():
    model, handle = spliced("exact")
    seen = []
    with ls.hooks(handle, {"L0.hook_acts": lambda acts, ctx: seen.append((acts.shape[1], ctx.past_length, ctx.layer))}):
        model.generate(ids(1, 5), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert seen == [(5, 0, 0), (1, 5, 0), (1, 6, 0), (1, 7, 0)]


@torch.no_grad()
def test_plain_pytorch_hooks_on_a_hook_point_see_and_edit_the_activations():
    model, handle = spliced()
    point = model.model.layers[2].self_attn.hook_acts
    seen = []
    remover = point.register_forward_hook(lambda module, args, out: seen.append((out, args[1])))
    assert point.live
    logits = model(ids()).logits
    remover.remove()
    assert not point.live
    cache = ls.run_with_cache(handle, ids(), ["L2.hook_acts"])
    assert torch.equal(seen[0][0], cache["L2.hook_acts"]) and isinstance(seen[0][1], HeadContext)
    assert torch.allclose(logits, cache.logits, atol=1e-5)
    with InterventionSet([Ablate("L2.H5")]).applied(handle):
        ablated = model(ids()).logits
    remover = point.register_forward_hook(lambda module, args, out: zero_head(out))
    try:
        assert torch.equal(model(ids()).logits, ablated)
    finally:
        remover.remove()


@torch.no_grad()
def test_nothing_is_materialised_until_a_point_listens(monkeypatch):
    model, handle = spliced()
    calls = {"pattern": 0, "activate": 0}
    for name, method in (("pattern", "_pattern"), ("activate", "activate")):
        original = getattr(Lorsa, method)

        def counted(self, *args, original=original, name=name):
            calls[name] += 1
            return original(self, *args)

        monkeypatch.setattr(Lorsa, method, counted)
    model(ids())
    assert calls == {"pattern": 0, "activate": 0}  # the fast path: fused attention, K rows of W_O
    with ls.hooks(handle, {"L2.hook_in": lambda x: None, "L2.hook_out": lambda x: None}):
        model(ids())
    assert calls == {"pattern": 0, "activate": 0}
    with ls.hooks(handle, {"L2.hook_acts": lambda x: None}):
        model(ids())
    assert calls == {"pattern": 0, "activate": 1}
    with ls.hooks(handle, {"L2.hook_pattern": lambda x: None}):
        model(ids())
    assert calls == {"pattern": 1, "activate": 1}


# ---- the attention slot ------------------------------------------------------------------------------------------


@torch.no_grad()
def test_watch_attention_reads_a_spliced_layer_as_its_hook_points_do_and_stops_after_the_deepest():
    model, handle = spliced()
    later = []
    model.model.layers[2].register_forward_hook(lambda *args: later.append(True))
    with watch_attention(model, [0, 1], stop=True) as calls:
        model(ids(), use_cache=False)
    assert not later and set(calls) == {0, 1}
    assert type(calls[1].module).__name__ == "LlamaAttention" and calls[1].result.shape == (2, 7, 64)
    cache = ls.run_with_cache(handle, ids(), ["L0.hook_in", "L0.hook_out"])
    assert torch.equal(calls[0].hidden_states, cache["L0.hook_in"]) and torch.equal(calls[0].result, cache["L0.hook_out"])
    later.clear()
    stopped = ls.run_with_cache(handle, ids(), ["L0.hook_acts"], stop=True)
    assert stopped.logits is None and stopped.keys() == ["L0.hook_acts"] and not later
    with pytest.raises(LorsaSurgeryError, match="out of range"):
        with watch_attention(model, [3]):
            pass


# ---- nnsight -----------------------------------------------------------------------------------------------------


def nnsight_edit(model, input_ids: torch.Tensor, layer: int, head: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the head's activations as read inside an nnsight trace, the logits with the head set to `value` there)."""
    nnsight = pytest.importorskip("nnsight")
    wrapped = nnsight.NNsight(model)
    try:
        point = wrapped.model.layers[layer].self_attn.hook_acts
        with wrapped.trace(input_ids):
            read = point.output[..., head].clone().save()
            point.output[..., head] = value
            logits = wrapped.output.logits.save()
    finally:  # nnsight instruments every module for good; take it off, so the model (shared by tests) is as it was
        for module in model.modules():
            for key in [k for k, v in vars(module).items() if type(v).__module__.startswith("nnsight")]:
                del module.__dict__[key]
    assert not model.model.layers[layer].self_attn.hook_acts.live
    return read, logits


def edited_logits(handle, input_ids: torch.Tensor, head: str, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits with `head` ablated, and clamped at `value`, by Ablate and Steer, on the route nnsight's run takes:
    it instruments every module, so every hook point listens and the layer materialises the pattern (equal to the fused
    kernel's route to rounding, checked here too)."""
    out = []
    for record in (Ablate(head), Steer(head, clamp=value)):
        with InterventionSet([record]).applied(handle):
            fused = handle.model(input_ids).logits
            with ls.hooks(handle, listening(handle)):
                out.append(handle.model(input_ids).logits)
        assert torch.allclose(out[-1], fused, atol=1e-4)
    return out[0], out[1]


@torch.no_grad()
def test_nnsight_reads_and_sets_a_head_as_ablate_and_steer_do():
    for mode in ("replace", "exact"):
        model, handle = spliced(mode)
        with ls.hooks(handle, listening(handle)):
            clean = ls.run_with_cache(handle, ids(), ["L2.hook_acts"])["L2.hook_acts"][..., 5]
        ablated, steered = edited_logits(handle, ids(), "L2.H5", 3.0)
        read, logits = nnsight_edit(model, ids(), 2, 5, 0.0)
        assert torch.equal(read, clean) and torch.equal(logits, ablated)
        assert torch.equal(nnsight_edit(model, ids(), 2, 5, 3.0)[1], steered)


# ---- SmolLM2, layers 3 and 18 ------------------------------------------------------------------------------------

PROMPT = "The lighthouse keeper climbed the spiral stairs every evening. The lighthouse keeper"


@pytest.fixture(scope="module")
def smollm2_spliced(smollm2):
    model, tok = smollm2
    handle = splice(model, {layer: ls.module_for(model, layer, "default") for layer in (3, 18)})
    yield model, handle, tok(PROMPT, return_tensors="pt").input_ids
    handle.unsplice()


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_cached_activations_equal_the_recorders_and_the_pattern_lorsas(smollm2_spliced):
    model, handle, prompt = smollm2_spliced
    n = handle[3].lorsa.cfg.n_ov_heads  # 1152; layer 18's module has 4608
    with Recorder(handle, [f"L3.H0-{n - 1}", f"L18.H0-{handle[18].lorsa.cfg.n_ov_heads - 1}"]) as rec:
        model(prompt)
    cache = ls.run_with_cache(handle, prompt, ["hook_acts"])
    assert torch.equal(cache["L3.hook_acts"], rec.activations()[..., :n])
    assert torch.equal(cache["L18.hook_acts"], rec.activations()[..., n:])
    assert (cache["L18.hook_acts"] != 0).sum(-1).max() <= handle[18].lorsa.cfg.top_k
    patterns = ls.run_with_cache(handle, prompt, ["hook_in", "hook_pattern"])
    for layer in (3, 18):
        expected = handle[layer].lorsa.attention_pattern(patterns[f"L{layer}.hook_in"])
        assert torch.allclose(patterns[f"L{layer}.hook_pattern"], expected, atol=1e-6)


@pytest.mark.slow
def test_smollm2_gradients_reach_the_head_activations(smollm2_spliced):
    model, handle, prompt = smollm2_spliced
    cache = ls.run_with_cache(handle, prompt, ["hook_acts"], grad=True)
    cache.logits[0, -1].logsumexp(-1).backward()
    for layer in (3, 18):
        grad = cache[f"L{layer}.hook_acts"].grad
        assert grad is not None and grad.shape == cache[f"L{layer}.hook_acts"].shape and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_plain_forward_hook_and_nnsight_read_and_set_a_head(smollm2_spliced):
    model, handle, prompt = smollm2_spliced
    seen = []
    remover = model.model.layers[18].self_attn.hook_acts.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        model(prompt)
    finally:
        remover.remove()
    cache = ls.run_with_cache(handle, prompt, ["L18.hook_acts"])
    assert torch.equal(seen[0], cache["L18.hook_acts"])
    head = int(cache["L18.hook_acts"][0, -1].argmax())  # a head that fires at the last token
    ablated, steered = edited_logits(handle, prompt, f"L18.H{head}", 20.0)
    assert not torch.allclose(ablated, cache.logits, atol=1e-3)
    with ls.hooks(handle, listening(handle)):
        clean = ls.run_with_cache(handle, prompt, ["L18.hook_acts"])["L18.hook_acts"][..., head]
    read, logits = nnsight_edit(model, prompt, 18, head, 0.0)
    assert torch.equal(read, clean) and torch.equal(logits, ablated)
    assert torch.equal(nnsight_edit(model, prompt, 18, head, 20.0)[1], steered)
