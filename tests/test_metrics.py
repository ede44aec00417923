"""What a replacement keeps: KL to the original, LM losses, and the mean-ablation floor they are measured against."""

import pytest
import torch

import lorsa_surgery as ls
from lorsa_surgery.host.hooks import watch_attention
from lorsa_surgery.host.metrics import attention_means, compare, loss_recovered, mean_ablated
from test_splice import tiny

IDS = torch.tensor([[1, 17, 45, 3, 88, 17, 45, 9, 60, 2], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]])


@torch.no_grad()
def test_attention_means_are_the_mean_output_over_real_tokens():
    model = tiny("llama")
    mask = torch.ones_like(IDS)
    mask[1, 7:] = 0  # right padding does not count
    with watch_attention(model, [0, 2]) as calls:
        model(input_ids=IDS, attention_mask=mask, use_cache=False)
    means = attention_means(model, [0, 2], IDS, mask, batch_size=1)
    for layer in (0, 2):
        out = calls[layer].result
        expected = torch.cat([out[0], out[1, :7]]).double().mean(0).float()
        assert torch.allclose(means[layer], expected, atol=1e-6)


@torch.no_grad()
def test_mean_ablated_layers_stop_mixing_positions_and_come_back_off():
    model = tiny("llama")
    layers = range(model.config.num_hidden_layers)
    means = attention_means(model, list(layers), IDS)
    other = IDS.clone()
    other[:, :5] = 40  # different earlier tokens, same last token
    plain = model(IDS).logits
    with mean_ablated(model, means):
        ablated, changed = model(IDS).logits, model(other).logits
    # With no attention left, the last position sees only its own token.
    assert torch.allclose(ablated[:, -1], changed[:, -1], atol=1e-5)
    assert not torch.allclose(ablated, plain, atol=1e-3)
    assert torch.equal(model(IDS).logits, plain)


@torch.no_grad()
def test_compare_gives_kl_and_losses_against_the_original():
    model = tiny("llama")
    same = compare(model, IDS)
    assert same["kl"] == 0.0 and same["lm_loss_original"] == same["lm_loss_spliced"] and same["tokens"] == 18
    copies = {layer: ls.exact_copy(model, layer) for layer in range(model.config.num_hidden_layers)}
    spliced = compare(model, IDS, candidate=lambda: ls.splice(model, copies))
    assert abs(spliced["kl"]) < 1e-6 and spliced["lm_loss_spliced"] == pytest.approx(same["lm_loss_original"], abs=1e-5)
    means = attention_means(model, list(copies), IDS)
    floor = compare(model, IDS, candidate=lambda: mean_ablated(model, means))
    assert floor["kl"] > 1e-3 and floor["lm_loss_original"] == same["lm_loss_original"]
    assert loss_recovered(2.0, 2.1, 3.0) == pytest.approx(0.9) and loss_recovered(2.0, 3.0, 3.0) == 0.0
