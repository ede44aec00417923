"""Positional/symbolic scores, classification, frequency use, discrepancy and the natural-language probe."""

import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from lorsa_surgery import Lorsa, LorsaSurgeryError
from lorsa_surgery.multihop import positional as P
from lorsa_surgery.multihop import tasks as multihop
from lorsa_surgery.host.arch import exact_copy


pytestmark = pytest.mark.usefixtures("one_torch_thread")

T = 12
PEAK = 4


def _causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, S] for every query -> [B, 1, T, S] causal attention."""
    B, S = logits.shape
    full = logits[:, None, None, :].expand(B, 1, S, S)
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    return full.masked_fill(~mask, -math.inf).softmax(-1)


def fixed_position_head(x: torch.Tensor) -> torch.Tensor:
    """Attends to position PEAK whatever the tokens are."""
    logits = torch.zeros(x.shape[0], x.shape[1])
    logits[:, PEAK] = 5.0
    return _causal_softmax(logits)


def content_head(x: torch.Tensor) -> torch.Tensor:
    """Attends to the token carrying the marker feature x[..., 0] = 1, wherever it is."""
    return _causal_softmax(5.0 * x[..., 0])


def uniform_head(x: torch.Tensor) -> torch.Tensor:
    return _causal_softmax(torch.zeros(x.shape[0], x.shape[1]))


def _marked_input() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(1, T, 6)
    x[..., 0] = 0.0
    x[0, PEAK, 0] = 1.0
    return x


@pytest.mark.parametrize("block", [1, 2])
def test_sanity_values_of_synthetic_heads(block):
    x = _marked_input()
    s_pos, s_sym, _ = P.swap_scores(fixed_position_head, x, block=block)
    assert s_pos.item() > 0.98 and s_sym.item() < 0.05
    s_pos, s_sym, _ = P.swap_scores(content_head, x, block=block)
    assert s_pos.item() < 0.05 and s_sym.item() > 0.98
    s_pos, s_sym, ent = P.swap_scores(uniform_head, x, block=block)
    assert s_pos.item() == pytest.approx(1.0, abs=1e-5) and s_sym.item() == pytest.approx(1.0, abs=1e-5)
    assert ent.item() == pytest.approx(math.log(T), abs=1e-5)


def test_swap_batch_swaps_exactly_one_pair_per_row():
    x = torch.arange(T, dtype=torch.float32)[None, :, None]
    xs, blocks, pairs = P.swap_batch(x)
    assert len(pairs) == (T - 1) * (T - 2) // 2 and len(xs) == len(pairs) + 1
    assert torch.equal(xs[0, :, 0], x[0, :, 0])
    for row, (i, j) in zip(xs[1:, :, 0], pairs.tolist()):
        expected = torch.arange(T, dtype=torch.float32)
        expected[i], expected[j] = float(j), float(i)
        assert torch.equal(row, expected)
    assert torch.equal(xs[:, -1, 0], torch.full((len(xs),), T - 1.0)), "the query never moves"


def test_block_mode_leaves_out_the_oldest_keys():
    blocks, pairs = P.swap_pairs(n_keys=11, block=3)
    assert blocks.tolist() == [[2, 3, 4], [5, 6, 7], [8, 9, 10]]
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert P.swap_pairs(n_keys=10, block=3)[0].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert P.swap_pairs(n_keys=10, block=3, skip=1)[0].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert P.swap_pairs(n_keys=9, block=3, skip=1)[0].tolist() == [[3, 4, 5], [6, 7, 8]]
    assert P.swap_pairs(n_keys=6, block=1, skip=2)[0].flatten().tolist() == [2, 3, 4, 5]
    with pytest.raises(LorsaSurgeryError):
        P.swap_pairs(n_keys=5, block=3)


def test_classify_with_tolerance():
    s_pos = torch.tensor([[0.95, 0.02, 1.0, 0.5]])
    s_sym = torch.tensor([[0.05, 0.97, 1.0, 0.5]])
    assert P.classify(s_pos, s_sym) == [["positional", "symbolic", "mixed", "mixed"]]
    assert P.classify(s_pos, s_sym, gamma=0.01) == [["mixed", "mixed", "mixed", "mixed"]]
    with pytest.raises(LorsaSurgeryError):
        P.classify(s_pos, s_sym, gamma=0.7)


def _tiny(family: str):
    torch.manual_seed(0)
    if family == "gptj":
        return GPTJForCausalLM(GPTJConfig(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2, rotary_dim=16,
                                          bos_token_id=None, eos_token_id=None))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          bos_token_id=None, eos_token_id=None))
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, rotary_pct=0.5))


@pytest.mark.parametrize("family", ["gptj", "llama", "gpt2", "neox"])
def test_unswapped_row_equals_full_model_attention(family):
    model = _tiny(family).eval()
    model.set_attn_implementation("eager")
    ids = torch.randperm(40)[:T]
    full = model(ids[None], output_attentions=True).attentions
    with P.eager_eval(model):
        inputs = P.capture_attention_inputs(model, ids, [0, 1])
        for layer in (0, 1):
            xs, _, _ = P.swap_batch(inputs[layer].x)
            rows = inputs[layer].mhsa_pattern(xs)
            torch.testing.assert_close(rows[0], full[layer][0], atol=1e-5, rtol=0)
            assert not torch.equal(rows[1], rows[0]), "a swap changes the pattern of a random head"


def test_head_scores_restore_the_model_and_check_layers():
    model = _tiny("llama").train()
    impl = model.config._attn_implementation
    scores = P.head_scores(model, torch.randint(0, 40, (3, T)), progress=False)
    assert scores.positional.shape == (2, 4) and scores.layers == [0, 1]
    assert model.training and model.config._attn_implementation == impl
    assert len(scores.labels()) == 2 and scores.to_dict()["labels"] == scores.labels()
    with pytest.raises(LorsaSurgeryError, match="out of range"):
        P.head_scores(model, torch.randint(0, 40, (1, T)), layers=[5], progress=False)


@pytest.mark.parametrize("family", ["gptj", "llama"])
def test_lorsa_qk_heads_score_like_the_heads_they_copy(family):
    model = _tiny(family)
    ids = torch.randint(0, 40, (2, T))
    lorsa = exact_copy(model, 1)
    mhsa = P.head_scores(model, ids, layers=[1], progress=False)
    qk = P.head_scores(model, ids, lorsa={1: lorsa}, progress=False)
    torch.testing.assert_close(qk.positional, mhsa.positional, atol=1e-5, rtol=0)
    torch.testing.assert_close(qk.symbolic, mhsa.symbolic, atol=1e-5, rtol=0)
    ov = qk.expand(lorsa.cfg.group_size)
    assert ov.positional.shape[-1] == lorsa.cfg.n_ov_heads
    assert torch.equal(ov.positional[:, 1], qk.positional[:, 0])
    g_mhsa = P.head_geometry(model, ids, layers=[1], progress=False)
    g_lorsa = P.head_geometry(model, ids, lorsa={1: lorsa}, progress=False)
    torch.testing.assert_close(g_lorsa.frequency_use, g_mhsa.frequency_use, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_lorsa.discrepancy, g_mhsa.discrepancy, atol=1e-4, rtol=1e-4)


def test_frequency_use_follows_the_pairing():
    model = _tiny("gptj")
    attn = P.attention_modules(model)[0]
    with torch.no_grad():  # head 0 reads only dims 0 and 1: plane 0 of interleaved pairs
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight[2:16] = 0.0
    ids = torch.randint(0, 40, (2, T))
    inter = P.head_geometry(model, ids, layers=[0], progress=False)
    assert inter.pairing == "interleaved" and inter.frequency_use.shape == (1, 2, 8)
    assert inter.frequency_use[0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    halves = P.head_geometry(model, ids, layers=[0], pairing="halves", progress=False)
    use = halves.frequency_use[0, 0]
    assert use[0] + use[1] == pytest.approx(1.0, abs=1e-6) and use.max() < 0.99
    assert inter.dominant_frequency()[0, 0] == pytest.approx(1.0)  # plane 0 turns one radian per position


def test_discrepancy_is_in_units_of_the_query_key_norms():
    model = _tiny("gptj")
    ids = torch.randint(0, 40, (2, T))
    before = P.head_geometry(model, ids, layers=[1], progress=False).discrepancy
    with torch.no_grad():
        P.attention_modules(model)[1].q_proj.weight.mul_(3.0)
    after = P.head_geometry(model, ids, layers=[1], progress=False).discrepancy
    assert (before > 0).all()
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-3)


def test_logit_gap_counts_a_tie_at_the_top_as_no_margin():
    row = torch.tensor([3.0, 3.0, 1.0, 0.0]).softmax(-1)
    assert P.logit_gap(row).item() == pytest.approx(0.0, abs=1e-6)
    assert P.logit_gap(torch.tensor([3.0, 1.0, 0.0]).softmax(-1)).item() == pytest.approx(2.0, abs=1e-5)
    assert P.logit_gap(torch.full((5,), 0.2)).item() == 0.0
    assert P.logit_gap(torch.ones(1)).item() == 0.0


def test_bound_formulas():
    assert P.positional_bound(4, 0.1).item() == pytest.approx(1 - math.cos(0.1))
    assert P.positional_bound(1000, 1.0).item() == pytest.approx(1 - math.cos(2 * math.pi / 1000))
    assert P.positional_bound(1000, 1.0).item() <= 2 * math.pi**2 / 1000**2
    assert P.positional_bound(11, 2.0, offset=5).item() == pytest.approx(1 - math.cos(2 * math.pi / 6))
    assert P.positional_bound(1, 1.0).item() == 0.0  # no other key
    assert P.symbolic_bound(1, 0.3, 8).item() == pytest.approx(1 - math.cos(2 * math.pi / 8))
    assert P.symbolic_bound(11, 0.01, 8).item() == pytest.approx(math.cos(0.1) - math.cos(2 * math.pi / 8 - 0.1))
    assert P.symbolic_bound(11, 2 * math.pi / 160, 8).item() == 0.0  # (n - 1) theta reached omega / 2
    assert len(multihop.lookup_alphabet("letter")) == 8 and len(multihop.lookup_alphabet("number")) == 120
    with pytest.raises(LorsaSurgeryError, match="positional or symbolic"):
        P.single_frequency_model("mixed", 0.1)


@pytest.mark.parametrize("theta", [0.05, 0.3, 1.0, 2 * math.pi * 0.618034, math.pi])
def test_hand_built_positional_head_stays_under_its_bound(theta):
    rng = torch.Generator().manual_seed(0)
    for offset in (0, 3, 10):
        model = P.single_frequency_model("positional", theta, offset=offset)
        for n in (12, 33, 120):
            ids = [torch.randint(8, (n,), generator=rng) for _ in range(3)]
            g = P.head_geometry(model, ids, progress=False)
            gap, bound = g.prompt_discrepancy[:, 0, 0].double(), P.positional_bound(n, theta, offset).item()
            assert (gap <= bound + 1e-5).all(), (offset, n, gap, bound)
            run = max(offset, n - 1 - offset)
            if run * theta <= math.pi:  # no offset turns back towards the target: the neighbour is the runner-up
                torch.testing.assert_close(gap, torch.full_like(gap, 1 - math.cos(theta)), atol=1e-5, rtol=0)
            if gap.min() > 1e-4:
                assert (g.prompt_offset[:, 0, 0] == offset).all()  # the construction attends where it was built to


@pytest.mark.parametrize("theta", [1e-3, 5e-3, 2e-2])
def test_hand_built_symbolic_head_keeps_its_guaranteed_margin(theta):
    rng = torch.Generator().manual_seed(1)
    omega = 2 * math.pi / 8
    model = P.single_frequency_model("symbolic", theta, alphabet_size=8)
    for n in (12, 33, 120):
        bound = P.symbolic_bound(n, theta, 8).item()
        ids = [P.one_match_prompt(rng, n, 8) for _ in range(6)]
        ids.append(P.one_match_prompt(rng, n, 8, match_at=0, rival_at=1))  # the worst place for both
        g = P.head_geometry(model, ids, progress=False)
        gap = g.prompt_discrepancy[:, 0, 0].double()
        assert (gap >= bound - 1e-5).all(), (n, gap, bound)
        worst = math.cos((n - 1) * theta) - math.cos(omega - (n - 2) * theta)
        assert worst - bound <= theta + 1e-9  # the bound is within one step of rotation of what is reached
        if worst > 0:
            assert gap[-1].item() == pytest.approx(worst, abs=1e-5)
        else:  # past the guarantee another key beats the match on the worst prompt
            assert bound == 0 and g.prompt_offset[-1, 0, 0].item() != n - 1
        if bound > 0:
            matches = [n - 1 - int((p[:-1] == (p[-1] + 1) % 8).nonzero()) for p in ids]
            assert g.prompt_offset[:, 0, 0].tolist() == matches


def test_probe_prompts_hold_their_answers():
    for p in P.probe_prompts("count", 8, n=20, seed=1):
        listed = p.text.split(": ", 1)[1].split(".\n")[0].split(", ")
        k = int(p.text.split("comes ")[1].split(" ")[0])
        assert listed == p.candidates and p.answer == listed[-1 - k]
    for p in P.probe_prompts("match", 8, n=20, seed=1):
        pairs = dict(item.split("-") for item in p.text.split(": ", 1)[1].split(".\n")[0].split(", "))
        key = p.text.split("paired with ")[1].split("?")[0]
        assert pairs[key] == p.answer and p.answer in p.candidates and p.text.endswith(f"Answer: {key}-")
    assert P.probe_prompts("match", 8, n=5, seed=1) == P.probe_prompts("match", 8, n=5, seed=1)
    assert P.probe_prompts("match", 8, n=5, seed=1) != P.probe_prompts("match", 8, n=5, seed=2)
    with pytest.raises(LorsaSurgeryError):
        P.probe_prompts("count", 2)


@pytest.mark.slow
def test_smollm2_heads_and_probe(smollm2):
    model, tok = smollm2
    prompts = P.probe_prompts("match", 6, n=4, seed=0)
    ids = P.probe_input_ids(tok, prompts)
    scores = P.head_scores(model, ids[:2], layers=[3], block=2, skip=1, progress=False)
    assert scores.positional.shape == (1, 9)
    with P.eager_eval(model):
        full = model(ids[0][None], output_attentions=True).attentions[3][0, :, -1]
        inputs = [P.capture_attention_inputs(model, prompt, [3])[3] for prompt in ids[:2]]
        torch.testing.assert_close(inputs[0].mhsa_pattern(inputs[0].x)[0, :, -1], full, atol=1e-5, rtol=0)
        # The score by hand: one swap at a time, each rerun alone, the formula written out.
        by_hand = torch.zeros(2, 9)
        for inp in inputs:
            x, T = inp.x, inp.x.shape[1]
            blocks, pairs = P.swap_pairs(T - 1, block=2, skip=1)
            d = inp.mhsa_pattern(x)[0, :, -1].double()
            cos_pos, cos_sym, gaps = [], [], []
            for I, J in pairs.tolist():
                order = torch.arange(T)
                order[blocks[I]], order[blocks[J]] = blocks[J], blocks[I]
                new = inp.mhsa_pattern(x[:, order])[0, :, -1].double()
                v = torch.stack([d[:, blocks[I]].sum(-1), d[:, blocks[J]].sum(-1)], -1)
                w = torch.stack([new[:, blocks[I]].sum(-1), new[:, blocks[J]].sum(-1)], -1)
                cos_pos.append(torch.cosine_similarity(w, v, dim=-1))
                cos_sym.append(torch.cosine_similarity(w, v.flip(-1), dim=-1))
                gaps.append((v[:, 0] - v[:, 1]).abs())
            alpha = (torch.stack(gaps) / 1e-4).softmax(0)
            by_hand += torch.stack([(alpha * torch.stack(cos_pos)).sum(0), (alpha * torch.stack(cos_sym)).sum(0)]).float()
    torch.testing.assert_close(scores.positional[0], by_hand[0] / 2, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.symbolic[0], by_hand[1] / 2, atol=1e-4, rtol=0)
    assert scores.positional.max() - scores.positional.min() > 0.05  # the heads of layer 3 are not all alike
    geometry = P.head_geometry(model, ids[:2], layers=[3], progress=False)
    assert geometry.pairing == "halves" and geometry.frequency_use.shape == (1, 9, 32)
    assert P.probe_accuracy(model, tok, prompts, progress=False) >= 0.5


def test_a_processed_space_module_is_scored_on_the_inputs_it_was_trained_for():
    """A checkpoint in processed coordinates reads the bare normalised residual: scored as `splice` maps it, its
    QK heads score like the MHSA heads it copies; fed the HF input unmapped, they would not."""
    model = _tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.2, 3.0)
    ids = torch.randint(0, 40, (2, T))
    processed = exact_copy(model, 1, input_space="processed")
    mhsa = P.head_scores(model, ids, layers=[1], progress=False)
    qk = P.head_scores(model, ids, lorsa={1: processed}, progress=False)
    torch.testing.assert_close(qk.positional, mhsa.positional, atol=1e-5, rtol=0)
    torch.testing.assert_close(qk.symbolic, mhsa.symbolic, atol=1e-5, rtol=0)
    g_mhsa = P.head_geometry(model, ids, layers=[1], progress=False)
    g_lorsa = P.head_geometry(model, ids, lorsa={1: processed}, progress=False)
    torch.testing.assert_close(g_lorsa.discrepancy, g_mhsa.discrepancy, atol=1e-4, rtol=1e-4)


def test_borderline_heads_are_those_whose_class_the_prompts_do_not_settle():
    from lorsa_surgery.multihop.positional import HeadScores

    pos, sym = torch.tensor([[0.99, 0.93, 0.5]]), torch.tensor([[0.0, 0.02, 0.5]])
    scores = HeadScores([0], pos, sym, torch.zeros(1, 3), torch.tensor([[0.01, 0.2, 0.01]]), torch.tensor([[0.01, 0.01, 0.01]]), 16)
    assert scores.labels() == [["positional", "positional", "mixed"]]
    assert scores.borderline() == [[False, True, False]]  # 0.93 - 2 * 0.2 / 4 = 0.83 falls under 1 - gamma
    assert scores.to_dict()["borderline"] == [[False, True, False]] and scores.expand(2).borderline()[0] == [False, False, True, True, False, False]
    with pytest.raises(LorsaSurgeryError, match="at least two prompts"):
        HeadScores([0], pos, sym, torch.zeros(1, 3)).borderline()
