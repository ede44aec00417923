"""Lorsa on the multi-hop task models (GPT-J): a module fitted to a layer (lorsa_surgery.multihop.fitting), and edge
attribution through spliced GPT-J layers."""

import pytest
import torch
import transformers

import lorsa_surgery as ls
from lorsa_surgery.analysis.circuits import attribute, attribute_edges, path_patch
from lorsa_surgery.host.arch import exact_copy
from lorsa_surgery.multihop import train as TR
from lorsa_surgery.multihop.fitting import fit_lorsa, task_prompts
from lorsa_surgery.multihop.tasks import TaskTokenizer, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_task_prompts_are_the_generators_examples_encoded():
    ids = task_prompts("letter", 12, "s", extra=3)
    assert ids.shape == (12, 20)
    assert torch.equal(ids, TaskTokenizer("letter").encode_examples(generate("letter", 12, seed="s", extra=3))[0])


def test_fitting_a_layer_explains_most_of_its_output_and_splices():
    model = TR.build_model(TR.preset("small", task="number", n_layer=2, n_embd=32, dropout=0.0)).eval()
    attention = model.transformer.h[1].attn
    with torch.no_grad():  # an output of order one, as after training (at initialisation it is near zero)
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
            torch.nn.init.normal_(linear.weight, std=32**-0.5)
    sizes = dict(prompts=256, held_out=64, n_qk_heads=2)
    _, before = fit_lorsa(model, "number", 1, steps=0, **sizes)
    lorsa, after = fit_lorsa(model, "number", 1, steps=150, **sizes)
    assert before < 0 and 0.5 < after <= 1  # measured -0.57 and 0.71
    assert (lorsa.cfg.host_layer, lorsa.cfg.n_ov_heads, lorsa.cfg.d_qk_head, lorsa.cfg.top_k) == (1, 64, 32, 16)
    ids = task_prompts("number", 4, "splice")
    original = model(ids).logits
    with ls.splice(model, {1: lorsa}):
        spliced = model(ids).logits
    assert spliced.shape == original.shape and not torch.equal(spliced, original)
    assert torch.equal(model(ids).logits, original)  # unspliced on leaving


@pytest.mark.parametrize("mlps", ["direct", "linearised"])
@pytest.mark.parametrize("rotary_dim", [8, 16])  # part of each head's 16 dimensions rotated, or all (as the task models)
def test_edges_through_spliced_gptj_layers_are_path_patching_to_first_order(mlps, rotary_dim):
    # GPT-J hands its attention (sin, cos) per rotary pair: edges must rotate queries and keys as the spliced module does.
    torch.manual_seed(0)
    config = transformers.GPTJConfig(vocab_size=97, n_embd=64, n_layer=3, n_head=4, rotary_dim=rotary_dim, n_positions=128,
                                     initializer_range=0.1, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "eager"
    model = transformers.GPTJForCausalLM(config).eval().double()  # at initializer_range 0.02 the edges are below what
    # the metric, computed in float32, resolves
    modules = {}
    for layer in range(3):  # exact copies made sparse and nearly linear, as in test_circuits
        modules[layer] = exact_copy(model, layer)
        with torch.no_grad():
            modules[layer].b_V.sub_(0.02)
            modules[layer].W_O.mul_(0.05)
    handle = ls.splice(model, modules)
    g = torch.Generator().manual_seed(1)
    clean, corrupt = (torch.randint(3, 97, (1, 8), generator=g) for _ in range(2))
    metric = ls.LogitDiff(5, 9)
    nodes = attribute(handle, clean, metric, corrupt)
    weights = attribute_edges(nodes, top=6, mlps=mlps).weights()
    for kind in ("q", "k", "v"):
        strongest = max((key for key in weights if key[2] == kind), key=lambda key: abs(weights[key]))
        assert path_patch(nodes, metric, *strongest, mlps=mlps) == pytest.approx(weights[strongest], rel=0.05), strongest
