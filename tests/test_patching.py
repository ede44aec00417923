"""Caching source runs, patching sweeps and metrics; the induction known answer on the real SmolLM2."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorsa_surgery import Lorsa, LorsaSurgeryError
from lorsa_surgery.interventions.edits import Ablate, InterventionSet, Patch, Recorder
from lorsa_surgery.interventions.patching import Effect, LogitDiff, Loss, Probability, cache_run, effect, forward, sweep
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.host.arch import exact_copy
from test_interventions import char_tokenizer, spliced


@torch.no_grad()
def test_cache_run_keeps_only_the_asked_heads_sparse_and_by_absolute_position():
    model, handle = spliced()
    prompts = [torch.randint(3, 97, (n,)) for n in (9, 6)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p) :], mask[i, 9 - len(p) :] = p, 1
    cache = cache_run(model, ids, "L1.H0-5,L1:five", attention_mask=mask)
    assert cache.heads == ["L1.H0", "L1.H1", "L1.H2", "L1.H3", "L1.H4", "L1.H5"] and cache.lengths == [9, 6]
    dense = cache.dense()
    assert len(cache.values) == int((dense != 0).sum()) < dense.numel()  # only heads that fired are stored
    for i, p in enumerate(prompts):  # a left-padded row holds what the prompt alone gives, at positions 0..n-1
        alone = cache_run(model, p, "L1.H0-5").dense()[0]
        assert (dense[i, : len(p)] - alone).abs().max() < 1e-5
    with Recorder(model, "L1.H0-5") as rec:
        model(prompts[0][None])
    assert torch.allclose(rec.activations(), cache_run(model, prompts[0], "L1.H0-5").dense())


@torch.no_grad()
def test_metrics_by_hand():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.allclose(LogitDiff(3, 7)(logits, ids, None), logits[:, -1, 3] - logits[:, -1, 7])
    assert torch.allclose(Probability(4, position=2)(logits, ids, None), logits[:, 2].softmax(-1)[:, 4])
    row0 = F.cross_entropy(logits[0, 2:4], ids[0, 3:5])  # only real tokens are predicted
    row1 = F.cross_entropy(logits[1, :4], ids[1, 1:])
    assert torch.allclose(Loss()(logits, ids, mask), torch.stack([row0, row1]))


@torch.no_grad()
def test_sweep_equals_one_patch_at_a_time():
    model, handle = spliced()
    clean, corrupted = torch.randint(3, 97, (2, 8)), torch.randint(3, 97, (2, 8))
    source = cache_run(model, clean, "L1.H0-40")
    metric = LogitDiff(5, 9)
    heads, positions = "L1.H3,L1:five,L1.H30-31", [0, 3, 7]
    result = sweep(model, corrupted, heads, metric, source=source, positions=positions, batch_size=6, progress=False)
    zeroed = sweep(model, corrupted, heads, metric, positions=positions, batch_size=4, progress=False)
    assert result.values.shape == (4, 3) and result.heads == ["L1.H3", "L1.H5", "L1.H30", "L1.H31"]
    assert result.names[1] == "L1.H5 (five)" and result.positions == positions and result.metric == "logit[5] - logit[9]"
    assert math.isclose(result.baseline, float(metric(forward(model, corrupted), corrupted, None).mean()), rel_tol=1e-6)
    for i, j in [(0, 0), (1, 1), (1, 2), (3, 2)]:  # entries from different batches of the sweep
        head, p = result.heads[i], positions[j]
        with InterventionSet([Patch(head, source, positions=[p])]).applied(model):
            assert math.isclose(result.values[i, j], float(metric(model(corrupted).logits, corrupted, None).mean()), abs_tol=1e-5)
        with InterventionSet([Ablate(head, positions=[p])]).applied(model):
            assert math.isclose(zeroed.values[i, j], float(metric(model(corrupted).logits, corrupted, None).mean()), abs_tol=1e-5)
    assert (result.values - result.baseline).abs().max() > 1e-4
    name, position, value = result.top(1)[0]
    assert abs(value - result.baseline) == pytest.approx(float((result.values - result.baseline).abs().max()))
    assert result.to_dict()["values"] == result.values.tolist()
    with pytest.raises(LorsaSurgeryError, match="covers positions up to 7, but position 9"):
        sweep(model, torch.randint(3, 97, (2, 10)), "L1.H3", metric, source=source, positions=[9], progress=False)


@torch.no_grad()
def test_effect_of_a_set_on_texts():
    model, handle = spliced()
    tok = char_tokenizer()
    texts = ["The cat sat on the mat.", "A" * 30]
    nothing = effect(handle, tok, texts, InterventionSet(), max_length=16)
    assert [e.tokens for e in nothing] == [21, 28]  # in windows of 16: 23 tokens -> 15 + 6 predicted, 30 -> 15 + 13
    assert all(e.loss_before == e.loss_after and e.kl == 0 and e.next_before == e.next_after for e in nothing)
    ablated = effect(handle, tok, texts, InterventionSet([Ablate("L1.H0-127")]))
    assert all(isinstance(e, Effect) and e.kl > 0 and e.loss_before != e.loss_after for e in ablated)
    logits = forward(handle, tok(texts[0], return_tensors="pt").input_ids)
    ids = tok(texts[0], return_tensors="pt").input_ids
    assert math.isclose(ablated[0].loss_before, F.cross_entropy(logits[0, :-1], ids[0, 1:]).item(), rel_tol=1e-5)


@pytest.mark.slow
def test_induction_heads_of_smollm2_known_answer(smollm2):
    """SmolLM2's induction heads L17.H3-5 and L18.H6 (attention from a repeated token to the token after its first
    occurrence is 0.73-0.90 for them), spliced as exact Lorsa copies: ablating their rank-1 heads breaks copying
    a repeated random sequence, ablating as many other heads does not, and patching them back in from the clean
    run restores it exactly."""
    model, _ = smollm2
    torch.manual_seed(0)
    n = 16
    half = torch.randint(1000, 20000, (2, n))
    ids = torch.cat([half, half], 1)

    def group(layer, heads):
        return ",".join(f"L{layer}.H{128 * h}-{128 * h + 127}" for h in heads)  # 64-wide heads: 128 rank-1 heads each

    induction, others = group(17, [3, 4, 5]) + "," + group(18, [6]), group(17, [0, 1]) + "," + group(18, [0, 1])

    def accuracy(records):
        with InterventionSet(records).applied(model):
            logits = forward(model, ids)
        return float((logits[:, n:-1].argmax(-1) == ids[:, n + 1 :]).float().mean())

    with splice(model, {17: exact_copy(model, 17), 18: exact_copy(model, 18)}):
        with Recorder(model, induction) as clean:
            base = accuracy([])
        assert base > 0.6
        assert accuracy([Ablate(induction)]) < 0.3
        assert accuracy([Ablate(others)]) > base - 0.1
        assert accuracy([Ablate(induction), Patch(induction, clean.cache())]) == base
