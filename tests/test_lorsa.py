"""The Lorsa module and its checkpoint formats.

Reference-written fixtures (tests/fixtures/lorsa_reference, written by llamascopium 2.0.0b34) pin the
reference semantics; every other option is checked against `naive_lorsa` below, a deliberately slow,
loop-per-head implementation written straight from the maths, on checkpoints written in each format.
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorsa_surgery import Lorsa, LorsaCache, LorsaConfig, LorsaSurgeryError
from lorsa_surgery.cli import main
from lorsa_surgery.lorsa.model import GroupAttention, Linear, Pick, Rotate, Scratch, build_mask
from conftest import FIXTURES

REF = FIXTURES / "lorsa_reference"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---- an independent, slow implementation ----------------------------------------------------------


def llama3_inv_freq(base, rd, factor, low, high, old_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    cfg = LlamaConfig(
        hidden_size=rd * 2,
        num_attention_heads=2,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": old_len,
        },
    )
    return _compute_llama3_parameters(cfg, "cpu")[0].double()


def rotate_naive(vec, pos, c):
    """Rotate one query/key vector [d_qk] at integer position pos, pair by pair."""
    rd = c["rotary_dim"]
    if c.get("use_NTK_by_parts_rope"):
        inv = llama3_inv_freq(c["rotary_base"], rd, c["NTK_by_parts_factor"], c["NTK_by_parts_low_freq_factor"],
                              c["NTK_by_parts_high_freq_factor"], c["old_context_len"])
    else:
        inv = torch.tensor([c["rotary_base"] ** (-2 * p / rd) for p in range(rd // 2)], dtype=torch.float64)
    out = vec.clone()
    for p in range(rd // 2):
        a, b = (2 * p, 2 * p + 1) if c["rotary_adjacent_pairs"] else (p, p + rd // 2)
        cos, sin = math.cos(pos * inv[p]), math.sin(pos * inv[p])
        out[a] = vec[a] * cos - vec[b] * sin
        out[b] = vec[a] * sin + vec[b] * cos
    return out


def naive_lorsa(c, w, x, positions, norm_in=None, norm_out=None):
    """Head activations and output for x [T, d] in float64, one head at a time, reference naming."""
    w = {k: v.double() for k, v in w.items()}
    x = x.double()
    d = c["d_model"]
    if norm_in is not None:
        x = x * math.sqrt(d) / norm_in
    n_qk, n_ov = w["W_Q"].shape[0], w["W_V"].shape[0]
    group = n_ov // n_qk
    T = x.shape[0]

    def qk(W, b, ln, h, t):
        vec = x[t] @ W[h] + b[h]
        if ln is not None:
            vec = vec / torch.sqrt((vec**2).mean() + c.get("eps", 1e-6)) * ln[h]
        return rotate_naive(vec, positions[t], c) if c["positional_embedding_type"] == "rotary" else vec

    z = torch.zeros(T, n_ov, dtype=torch.float64)
    for h in range(n_qk):
        q = torch.stack([qk(w["W_Q"], w["b_Q"], w.get("ln_q.w"), h, t) for t in range(T)])
        k = torch.stack([qk(w["W_K"], w["b_K"], w.get("ln_k.w"), h, t) for t in range(T)])
        scores = q @ k.T / c["attn_scale"]
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
        pattern = scores.softmax(-1)
        for i in range(h * group, (h + 1) * group):
            v = x @ w["W_V"][i] + w.get("b_V", torch.zeros(n_ov, dtype=torch.float64))[i]
            z[:, i] = pattern @ v
    dnorm = w["W_O"].norm(dim=1)
    acts = torch.zeros_like(z)
    for t in range(T):
        if c["act_fn"] == "topk":
            score = z[t].clamp_min(0) * dnorm
            for i in score.argsort(descending=True)[: c["top_k"]]:
                acts[t, i] = max(z[t, i].item(), 0.0)
        elif c["act_fn"] == "jumprelu":
            thr = w["activation_function.log_jumprelu_threshold"].exp()
            acts[t] = z[t] * (z[t] * dnorm > thr)
        else:
            acts[t] = z[t].clamp_min(0)
    out = acts @ w["W_O"]
    if "b_D" in w:
        out = out + w["b_D"]
    if norm_out is not None:
        out = out / (math.sqrt(d) / norm_out)
    return acts, out


# ---- writing reference-format checkpoints for any option combination --------------------------------


def reference_config(**over):
    c = {
        "sae_type": "lorsa", "d_model": 32, "expansion_factor": 2.0, "use_decoder_bias": True, "act_fn": "topk",
        "norm_activation": "dataset-wise", "sparsity_include_decoder_norm": True, "top_k": 5,
        "hook_point_in": "blocks.2.ln1.hook_normalized", "hook_point_out": "blocks.2.hook_attn_out",
        "n_qk_heads": 4, "d_qk_head": 8, "positional_embedding_type": "rotary", "rotary_dim": 8,
        "rotary_base": 10000, "rotary_adjacent_pairs": True, "rotary_scale": 1, "use_NTK_by_parts_rope": False,
        "NTK_by_parts_factor": 1.0, "NTK_by_parts_low_freq_factor": 1.0, "NTK_by_parts_high_freq_factor": 1.0,
        "old_context_len": 2048, "n_ctx": 16, "attn_scale": None, "use_post_qk_ln": False,
        "normalization_type": None, "eps": 1e-6,
    }
    c.update(over)
    c["attn_scale"] = c["attn_scale"] or math.sqrt(c["d_qk_head"])
    return c


def random_reference_weights(c, seed=0, norms=(2.5, 7.0), decoder_bias_name="b_D"):
    g = torch.Generator().manual_seed(seed)
    d, h, e = c["d_model"], c["n_qk_heads"], c["d_qk_head"]
    n = int(d * c["expansion_factor"])
    r = lambda *s: torch.randn(*s, generator=g)
    w = {"W_Q": r(h, d, e) / d**0.5, "W_K": r(h, d, e) / d**0.5, "b_Q": r(h, e) * 0.1, "b_K": r(h, e) * 0.1,
         "W_V": r(n, d) / d**0.5, "b_V": r(n) * 0.1, "W_O": r(n, d) / d**0.5}
    if c["use_decoder_bias"]:
        w[decoder_bias_name] = r(d) * 0.1
    if c["use_post_qk_ln"]:
        w["ln_q.w"], w["ln_k.w"] = 1 + 0.1 * r(h, e), 1 + 0.1 * r(h, e)
    if c["act_fn"] == "jumprelu":
        w["activation_function.log_jumprelu_threshold"] = torch.full((n,), -1.0) + 0.2 * r(n)
    if norms is not None:
        w[f"dataset_average_activation_norm.{c['hook_point_in']}"] = torch.tensor(norms[0])
        w[f"dataset_average_activation_norm.{c['hook_point_out']}"] = torch.tensor(norms[1])
    # What the reference also writes, and we ignore.
    w["mask"] = torch.ones(c["n_ctx"], c["n_ctx"]).tril().bool()
    w["IGNORE"] = torch.tensor(-math.inf)
    return w


def write_reference(folder, c, w):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    save_file(w, str(folder / "sae_weights.safetensors"))
    return folder


# ---- the reference fixtures ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "c"])
def test_reference_fixture_reproduces_stored_outputs(name):
    lorsa = Lorsa.from_pretrained(REF / name)
    io = load_file(str(REF / name / "reference_io.safetensors"))
    with torch.no_grad():
        acts = lorsa.encode(io["x"])
        out = lorsa(io["x"])
    assert rel(acts, io["head_activations"]) <= 1e-5
    assert rel(out, io["out"]) <= 1e-5
    assert torch.equal(acts != 0, io["head_activations"] != 0)
    assert rel(lorsa.decode(acts), io["out"]) <= 1e-5  # dense decode agrees with the sparse fast path


def test_fixtures_agree_with_naive_implementation():
    """The naive implementation is itself checked against the reference's own numbers."""
    for name in "ac":
        c = json.loads((REF / name / "config.json").read_text())
        w = load_file(str(REF / name / "sae_weights.safetensors"))
        io = load_file(str(REF / name / "reference_io.safetensors"))
        norm_in = w[f"dataset_average_activation_norm.{c['hook_point_in']}"].item()
        norm_out = w[f"dataset_average_activation_norm.{c['hook_point_out']}"].item()
        acts, out = naive_lorsa(c, w, io["x"][0], list(range(io["x"].shape[1])), norm_in, norm_out)
        assert rel(acts.float(), io["head_activations"][0]) <= 1e-5
        assert rel(out.float(), io["out"][0]) <= 1e-5


# ---- every option, against the naive implementation --------------------------------------------------

VARIANTS = {
    "halves-rotary": dict(rotary_adjacent_pairs=False),
    "partial-rotary": dict(d_qk_head=12, rotary_dim=4, rotary_adjacent_pairs=False),
    "partial-adjacent": dict(d_qk_head=12, rotary_dim=6),
    "ntk-by-parts": dict(use_NTK_by_parts_rope=True, rotary_base=500000, NTK_by_parts_factor=8.0,
                         NTK_by_parts_low_freq_factor=1.0, NTK_by_parts_high_freq_factor=4.0, old_context_len=8,
                         rotary_adjacent_pairs=False),
    "no-rotary": dict(positional_embedding_type="none"),
    "k1-group2": dict(top_k=1, n_qk_heads=32),
    "k-all-group64": dict(top_k=64, n_qk_heads=1),
    "no-decoder-bias": dict(use_decoder_bias=False),
    "folded-norms": dict(norm_activation="inference"),
    "qk-norm": dict(use_post_qk_ln=True, normalization_type="RMS", rotary_adjacent_pairs=False),
    "jumprelu": dict(act_fn="jumprelu"),
    "relu": dict(act_fn="relu"),
    "custom-attn-scale": dict(attn_scale=1.7),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_option_matches_naive(tmp_path, variant):
    c = reference_config(**VARIANTS[variant])
    folded = c["norm_activation"] == "inference"
    w = random_reference_weights(c, norms=None if folded else (2.5, 7.0))
    lorsa = Lorsa.from_pretrained(write_reference(tmp_path / variant, c, w))
    x = torch.randn(1, 11, c["d_model"]) * 3
    with torch.no_grad():
        acts, out = lorsa.encode(x), lorsa(x)
    ref_acts, ref_out = naive_lorsa(c, w, x[0], list(range(11)), *((None, None) if folded else (2.5, 7.0)))
    assert rel(acts[0], ref_acts.float()) <= 1e-5
    assert rel(out[0], ref_out.float()) <= 1e-5


def test_old_bias_name_and_missing_value_bias(tmp_path):
    c = reference_config()
    w = random_reference_weights(c, decoder_bias_name="b_O")
    del w["b_V"]
    lorsa = Lorsa.from_pretrained(write_reference(tmp_path / "old", c, w))
    x = torch.randn(1, 6, 32)
    w["b_D"] = w.pop("b_O")
    _, ref_out = naive_lorsa(c, w, x[0], list(range(6)), 2.5, 7.0)
    with torch.no_grad():
        assert rel(lorsa(x)[0], ref_out.float()) <= 1e-5


def test_paper_era_needs_opt_in_and_then_loads(tmp_path):
    d, h, e, n = 16, 2, 4, 8
    cfg = {"d_qk_head": e, "d_ov_head": 1, "n_qk_heads": h, "n_ov_heads": n, "mode": "top_k", "top_k": 3,
           "use_z_relu": True, "avg_norm": {"in": 2.0, "out": 5.0}, "d_model": d, "attn_scale": 2.0,
           "positional_embedding_type": "rotary", "rotary_dim": e, "rotary_base": 10000,
           "rotary_adjacent_pairs": False, "n_ctx": 32, "layer": 3, "model_name": "pythia-160m", "dtype": "torch.float32"}
    g = torch.Generator().manual_seed(1)
    w = {"W_Q": torch.randn(h, d, e, generator=g), "W_K": torch.randn(h, d, e, generator=g),
         "W_V": torch.randn(n, d, 1, generator=g), "W_O": torch.randn(n, 1, d, generator=g),
         "b_Q": torch.zeros(h, e), "b_K": torch.zeros(h, e), "b_V": torch.zeros(n, 1), "b_O": torch.randn(d, generator=g)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(w, tmp_path / "final.pth")
    with pytest.raises(LorsaSurgeryError, match="pickle"):
        Lorsa.from_pretrained(tmp_path)
    lorsa = Lorsa.from_pretrained(tmp_path, allow_pickle=True)
    assert lorsa.cfg.host_layer == 3 and lorsa.cfg.input_space == "processed"
    x = torch.randn(1, 7, d)
    ref = {"W_Q": w["W_Q"], "W_K": w["W_K"], "b_Q": w["b_Q"], "b_K": w["b_K"], "W_V": w["W_V"][..., 0],
           "b_V": w["b_V"][:, 0], "W_O": w["W_O"][:, 0], "b_D": w["b_O"]}
    c = {"d_model": d, "rotary_dim": e, "rotary_base": 10000, "rotary_adjacent_pairs": False,
         "positional_embedding_type": "rotary", "attn_scale": 2.0, "act_fn": "topk", "top_k": 3}
    _, ref_out = naive_lorsa(c, ref, x[0], list(range(7)), 2.0, 5.0)
    with torch.no_grad():
        assert rel(lorsa(x)[0], ref_out.float()) <= 1e-5


# ---- incremental steps, padding, long positions ----------------------------------------------------------


@pytest.fixture
def fixture_a():
    return Lorsa.from_pretrained(REF / "a")


@torch.no_grad()
def test_one_token_at_a_time_equals_full_pass(fixture_a):
    x = load_file(str(REF / "a" / "reference_io.safetensors"))["x"]
    full_acts = fixture_a.encode(x)
    full_out = fixture_a(x)
    cache = LorsaCache()
    steps = [fixture_a.encode(x[:, t : t + 1], cache=cache) for t in range(x.shape[1])]
    assert rel(torch.cat(steps, 1), full_acts) <= 1e-5
    cache = LorsaCache()
    chunks = [fixture_a(x[:, :20], cache=cache)] + [fixture_a(x[:, t : t + 1], cache=cache) for t in range(20, x.shape[1])]
    assert rel(torch.cat(chunks, 1), full_out) <= 1e-5


@torch.no_grad()
def test_left_padded_rows_equal_single_runs(fixture_a):
    torch.manual_seed(0)
    lengths = [9, 4, 7]
    xs = [torch.randn(1, n, 64) * 4 for n in lengths]
    T = max(lengths)
    batch = torch.zeros(len(xs), T, 64)
    pad = torch.zeros(len(xs), T, dtype=torch.long)
    for i, x in enumerate(xs):
        batch[i, T - x.shape[1] :] = x[0]
        pad[i, T - x.shape[1] :] = 1
    position_ids = (pad.cumsum(-1) - 1).clamp_min(0)
    out = fixture_a(batch, position_ids=position_ids, attention_mask=pad)
    assert torch.isfinite(out).all()
    for i, x in enumerate(xs):
        assert rel(out[i, T - x.shape[1] :], fixture_a(x)[0]) <= 1e-5


@torch.no_grad()
def test_positions_beyond_n_ctx(tmp_path):
    c = reference_config(n_ctx=16, rotary_adjacent_pairs=False)
    w = random_reference_weights(c)
    lorsa = Lorsa.from_pretrained(write_reference(tmp_path / "long", c, w))
    x = torch.randn(1, 40, 32)
    positions = list(range(1000, 1040))
    _, ref_out = naive_lorsa(c, w, x[0], positions, 2.5, 7.0)
    out = lorsa(x, position_ids=torch.tensor([positions]))
    assert rel(out[0], ref_out.float()) <= 1e-5


def test_four_d_masks_match_padding_mask():
    pad = torch.tensor([[0, 1, 1], [1, 1, 1]])
    from_2d = build_mask(pad, 2, 3, 3, torch.device("cpu"))
    additive = torch.where(from_2d, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(build_mask(additive, 2, 3, 3, torch.device("cpu")), from_2d)
    assert from_2d[0, 0, 0].all()  # a query on padding attends everywhere rather than nowhere


# ---- native format ----------------------------------------------------------------------------------------


def test_native_round_trip_is_exact(tmp_path, fixture_a):
    fixture_a.catalog = {3: {"label": "induction", "note": "copies the token after the previous match"}}
    fixture_a.cfg.host_model = "org/model"
    fixture_a.training_info = {"tokens": 1000, "explained_variance": 0.9}
    fixture_a.save_pretrained(tmp_path / "native")
    again = Lorsa.from_pretrained(tmp_path / "native")
    for k, v in fixture_a.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert again.catalog == fixture_a.catalog
    assert again.training_info == fixture_a.training_info
    assert again.cfg == fixture_a.cfg
    assert again.cfg.input_space == "processed"
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        assert torch.equal(fixture_a(x), again(x))
    meta = json.loads((tmp_path / "native" / "lorsa_config.json").read_text())
    assert meta["format_version"] == 1 and meta["config"]["host_layer"] == 1


# ---- malformed input -------------------------------------------------------------------------------------


def test_errors_are_clear(tmp_path):
    with pytest.raises(LorsaSurgeryError, match="Missing file or folder"):
        Lorsa.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(LorsaSurgeryError, match="No Lorsa checkpoint"):
        Lorsa.from_pretrained(tmp_path)

    c = reference_config()
    w = random_reference_weights(c)
    write_reference(tmp_path / "sae", dict(c, sae_type="standard"), w)
    with pytest.raises(LorsaSurgeryError, match="sae_type 'standard'"):
        Lorsa.from_pretrained(tmp_path / "sae")

    write_reference(tmp_path / "div", dict(c, n_qk_heads=5), w)
    with pytest.raises(LorsaSurgeryError, match="divisible"):
        Lorsa.from_pretrained(tmp_path / "div")

    bad = dict(w, W_V=torch.zeros(64, 31))
    write_reference(tmp_path / "shape", c, bad)
    with pytest.raises(LorsaSurgeryError, match="W_V has shape"):
        Lorsa.from_pretrained(tmp_path / "shape")

    write_reference(tmp_path / "contradiction", dict(c, d_qk_head=4, rotary_dim=4), w)
    with pytest.raises(LorsaSurgeryError, match="contradict"):
        Lorsa.from_pretrained(tmp_path / "contradiction")

    extra = dict(w, surprise=torch.zeros(1))
    write_reference(tmp_path / "extra", c, extra)
    with pytest.raises(LorsaSurgeryError, match="unexpected surprise"):
        Lorsa.from_pretrained(tmp_path / "extra")

    missing = {k: v for k, v in w.items() if k != "W_K"}
    write_reference(tmp_path / "missing", c, missing)
    with pytest.raises(LorsaSurgeryError, match="missing W_K"):
        Lorsa.from_pretrained(tmp_path / "missing")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(LorsaSurgeryError, match="not valid JSON"):
        Lorsa.from_pretrained(tmp_path / "broken")

    with pytest.raises(LorsaSurgeryError, match="d_model=64"):
        Lorsa.from_pretrained(REF / "a")(torch.randn(1, 3, 32))


def test_cli_inspect(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(REF / "c"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "reference" and info["act_fn"] == "jumprelu" and info["n_ov_heads"] == 128
    assert info["folded_norms"] == {"in": pytest.approx(3.7), "out": pytest.approx(11.2)}
    assert info["rotary"]["pairs"].startswith("adjacent")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "Missing file or folder" in result.output


def test_tensors_cached_in_inference_mode_never_reach_autograd(fixture_a):
    """A frozen module inside a model being fine-tuned: decode steps in inference mode, then a training step."""
    x = torch.randn(1, 6, 64)
    with torch.inference_mode():
        fixture_a(x)  # builds and caches the fused projection and decoder norms
    fixture_a.requires_grad_(False)
    inp = x.clone().requires_grad_(True)
    fixture_a(inp).sum().backward()  # raised "Inference tensors cannot be saved for backward" when reused
    assert inp.grad is not None and inp.grad.abs().sum() > 0


def test_attention_logit_soft_cap(fixture_a):
    """cap * tanh(score / cap) before the softmax, in the fused path and in the materialised pattern alike."""
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        plain = fixture_a.attention_pattern(x)
        fixture_a.cfg.attn_logit_softcap = 0.5
        capped = fixture_a.attention_pattern(x)
        q, k, _, _ = fixture_a._attend_inputs(x, None, None, None)
        scores = (q @ k.transpose(-1, -2)) / fixture_a.cfg.attn_scale
        expected = (0.5 * torch.tanh(scores / 0.5)).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        assert rel(capped, expected) <= 1e-6 and rel(capped, plain) > 1e-3
        z = fixture_a.hidden_pre(x)
        v = fixture_a.project(x, torch.arange(7)[None])[2]
        assert rel(z, (capped @ v).transpose(1, 2).reshape(1, 7, -1)) <= 1e-5
    with pytest.raises(LorsaSurgeryError, match="attn_logit_softcap must be positive"):
        LorsaConfig(d_model=8, n_qk_heads=1, d_qk_head=4, n_ov_heads=2, top_k=1, attn_logit_softcap=0.0)


# ---- the training path: its own rotation and attention backward ------------------------------------------


@pytest.mark.parametrize("adjacent,rotary_dim", [(False, 8), (True, 8), (False, 4), (True, 6)])
def test_rotation_is_the_textbook_formula_to_the_bit_both_ways(adjacent, rotary_dim):
    """Rotate writes x * cos + rotate_half(x) * sin half by half; forward and gradient keep its bits."""
    x = torch.randn(2, 9, 3, 8, requires_grad=True)
    angles = torch.randn(2, 9, 1, rotary_dim // 2)
    angles = angles.repeat_interleave(2, -1) if adjacent else torch.cat([angles, angles], -1)
    cos, sin = angles.cos(), angles.sin()

    def textbook(x):
        r, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        if adjacent:
            turned = torch.stack([-r[..., 1::2], r[..., 0::2]], -1).flatten(-2)
        else:
            turned = torch.cat([-r[..., rotary_dim // 2:], r[..., : rotary_dim // 2]], -1)
        return torch.cat([r * cos + turned * sin, rest], -1)

    grad = torch.randn(2, 9, 3, 8)
    ours = Rotate.apply(x, cos, sin, adjacent)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    expected = textbook(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(ours, expected) and torch.equal(ours_grad, expected_grad)


@pytest.mark.parametrize("T", [7, 150, 300])
def test_group_attention_gradients_match_float64_attention(T, monkeypatch):
    """The training backward (one pattern per group, in blocks of queries and heads) against autograd through
    float64 attention over each slice: several blocks of queries, and heads that do not split evenly."""
    monkeypatch.setattr(GroupAttention, "HEADS", 2)
    B, H, D, G = 2, 5, 8, 24
    q, k = torch.randn(B, H, T, D, dtype=torch.float64), torch.randn(B, H, T, D, dtype=torch.float64)
    v = torch.randn(B, T, H, G, dtype=torch.float64).transpose(1, 2)  # laid out as the projection makes it
    grad = torch.randn(B, T, H, G, dtype=torch.float64)
    inputs32 = [t.float().requires_grad_() for t in (q, k, v)]
    assert GroupAttention.applies(*inputs32)
    z = GroupAttention.apply(*inputs32, 0.3)
    z.backward(grad.float())
    inputs64 = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*inputs64, is_causal=True, scale=0.3).transpose(1, 2)
    expected.backward(grad)
    assert rel(z.double(), expected) <= 1e-6
    for ours, theirs in zip(inputs32, inputs64):
        assert rel(ours.grad.double(), theirs.grad) <= 1e-6


def test_a_training_step_takes_the_grouped_path_and_matches_the_plain_one(monkeypatch):
    """A module whose groups are twice the query width trains through GroupAttention; the gradients equal, to float
    rounding, those through the per-slice fused kernel's own backward."""
    lorsa = Lorsa(LorsaConfig(d_model=32, n_qk_heads=3, d_qk_head=8, n_ov_heads=48, top_k=6, n_ctx=64))
    x, y = torch.randn(2, 40, 32), torch.randn(2, 40, 32)

    def gradients():
        lorsa.zero_grad()
        (lorsa(x) - y).pow(2).sum().backward()
        return [p.grad.clone() for p in lorsa.parameters()]

    calls = []
    backward = GroupAttention.backward
    monkeypatch.setattr(GroupAttention, "backward", staticmethod(lambda ctx, dz: calls.append(1) or backward(ctx, dz)))
    grouped = gradients()
    assert calls
    monkeypatch.setattr(GroupAttention, "applies", staticmethod(lambda *inputs: False))
    plain = gradients()
    assert len(calls) == 1
    for a, b in zip(grouped, plain):
        assert rel(a, b) <= 1e-5


def test_ranking_in_blocks_selects_what_one_block_would(monkeypatch):
    """Top-K scores go through a small buffer a block of tokens at a time; the selection is that of one pass."""
    for topk_score in ("relu", "abs"):
        lorsa = Lorsa(LorsaConfig(d_model=32, n_qk_heads=2, d_qk_head=8, n_ov_heads=64, top_k=5, n_ctx=64,
                                  topk_score=topk_score))
        x = torch.randn(3, 20, 32)
        with torch.no_grad():
            z = lorsa.hidden_pre(x)
            score = (z if topk_score == "relu" else z.abs()) * lorsa.W_O.norm(dim=1)
            expected = score.topk(5, dim=-1).indices.sort(-1).values
            whole = lorsa._topk(z)
            monkeypatch.setattr(Lorsa, "SCORE_BYTES", 7 * 64 * 4)  # 7 tokens a block, the last one shorter
            blocked = lorsa._topk(z)
            monkeypatch.undo()
        assert torch.equal(blocked[0].sort(-1).values, expected) and torch.equal(whole[0].sort(-1).values, expected)
        assert torch.equal(blocked[1], whole[1])


def test_scratch_hands_out_memory_again_only_when_nothing_holds_it(monkeypatch):
    """A buffer comes back once its tensor, and every view and saved copy of it, is gone; never while one is held.
    Free buffers of another shape make room under the limit, and other devices get fresh tensors."""
    scratch, like = Scratch(), torch.empty(0)
    a = scratch.empty((4, 6), like)
    held = a[1:]
    address = a.data_ptr()
    del a
    b = scratch.empty((4, 6), like)
    assert b.data_ptr() != address  # a view of the first is still held
    del held
    c = scratch.empty((6, 4), like)  # as many elements, another shape: the first buffer again
    assert c.data_ptr() == address and c.shape == (6, 4)
    saved = torch.randn(6, 4, requires_grad=True)
    out = c.copy_(torch.ones(6, 4)) * saved  # c is saved for the backward
    del c
    assert scratch.empty((6, 4), like).data_ptr() != address
    out.sum().backward()
    assert scratch.empty((6, 4), like).data_ptr() == address
    assert len(scratch.kept) == 3
    del b
    monkeypatch.setattr(Scratch, "LIMIT", 3 * 24 * 4)
    scratch.empty((5,), like)  # another shape, over the limit: one free buffer of the old shape makes room
    assert sorted(t.numel() for t in scratch.kept) == [5, 24, 24]
    big = scratch.empty((100,), like)  # more than the limit: not kept, and nothing goes for it
    assert big.shape == (100,) and sorted(t.numel() for t in scratch.kept) == [5, 24, 24]
    assert scratch.empty((3,), torch.empty(0, device="meta")).device.type == "meta" and len(scratch.kept) == 3


def test_values_and_pick_match_linear_and_gather():
    """The two operations that write into scratch memory give the values and gradients of F.linear and gather, and
    a second call does not overwrite a result still held."""
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 5, 4), (7, 4), (7,)))
    assert torch.autograd.gradcheck(Linear.apply, (x, w, b))
    assert torch.equal(Linear.apply(x, w, b), torch.nn.functional.linear(x, w, b))
    z = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    idx = torch.randn(2, 5, 7).topk(3, dim=-1).indices
    assert torch.autograd.gradcheck(lambda z: Pick.apply(z, idx), (z,))
    first = Linear.apply(x, w, b)
    kept = first.detach().clone()
    Linear.apply(x * 2, w, b).sum().backward()
    assert torch.equal(first, kept)


def test_training_steps_leave_a_kept_pre_activation_alone():
    """Pre-activations a caller keeps from one training step are not overwritten by the next, which reuses the
    memory of everything the caller let go."""
    lorsa = Lorsa(LorsaConfig(d_model=32, n_qk_heads=3, d_qk_head=8, n_ov_heads=48, top_k=6, n_ctx=64))
    x = torch.randn(2, 40, 32)
    z = lorsa.hidden_pre(x)
    kept = z.detach().clone()
    for _ in range(2):
        lorsa(torch.randn(2, 40, 32)).pow(2).sum().backward()
    assert torch.equal(z, kept)


def test_training_under_cpu_autocast_takes_the_plain_path(monkeypatch):
    """Under CPU autocast the projections are left to autocast (bfloat16, as F.linear gives them), so the training
    step takes the fused kernels rather than the float32-only grouped attention, and its backward runs."""
    lorsa = Lorsa(LorsaConfig(d_model=32, n_qk_heads=3, d_qk_head=8, n_ov_heads=48, top_k=6, n_ctx=64))
    x = torch.randn(2, 40, 32)
    monkeypatch.setattr(GroupAttention, "forward", staticmethod(lambda *args: pytest.fail("grouped path under autocast")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lorsa.hidden_pre(x)
        out = lorsa(x)
    out.float().pow(2).sum().backward()
    assert z.dtype == torch.bfloat16 and lorsa.W_V.grad.abs().sum() > 0
