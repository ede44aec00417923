"""Every head name the tools print parses back; QK groups and MHSA heads resolve to the right heads; an MHSA head
ablated through its exact copy, directly on the original attention, and by hand agree; the host model carries one
library attribute."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from lorsa_surgery import Lorsa, LorsaConfig, LorsaSurgeryError
from lorsa_surgery.host.arch import exact_copy
from lorsa_surgery.host.metrics import token_windows
from lorsa_surgery.host.models import generate_text, load_model
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.interventions.edits import Ablate, InterventionSet, Patch, Steer, splice_of
from lorsa_surgery.interventions.heads import HeadRef, head_name, parse_heads, resolve_heads, split_heads
from lorsa_surgery.interventions.patching import cache_run
from test_interventions import char_tokenizer, cli, spliced, tiny_folders
from test_splice import sparse_module, tiny

LAYER = 1
HEAD_DIM = 16  # every tiny model: 4 MHSA heads of width 16, so an exact copy has 4 QK groups of 32 heads
PROJECTION = {"llama": "o_proj", "qwen2": "o_proj", "gpt2": "c_proj", "gpt_neox": "dense"}
TEXT = "The cat sat on the mat."


def heads_of(h: int) -> list[HeadRef]:
    return [HeadRef(LAYER, i) for i in range(2 * HEAD_DIM * h, 2 * HEAD_DIM * (h + 1))]


def by_hand(model, family: str, ids: torch.Tensor, head: int, positions: slice = slice(None)) -> torch.Tensor:
    """Logits with MHSA head `head` of layer 1 zeroed at `positions` on the output projection's input."""
    block = model.gpt_neox.layers if family == "gpt_neox" else model.transformer.h if family == "gpt2" else model.model.layers
    attention = block[LAYER].attention if family == "gpt_neox" else block[LAYER].attn if family == "gpt2" else block[LAYER].self_attn

    def zero(module, args):
        x = args[0].clone()
        x[:, positions, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
        return (x,)

    remover = getattr(attention, PROJECTION[family]).register_forward_pre_hook(zero)
    try:
        return model(ids).logits
    finally:
        remover.remove()


def run(model, ids: torch.Tensor, records) -> torch.Tensor:
    with InterventionSet(records).applied(model):
        return model(ids).logits


# ---- names -------------------------------------------------------------------------------------------------------


def test_every_name_the_tools_print_parses_back(tmp_path):
    model, handle = spliced()
    for ref in (HeadRef(1, 0), HeadRef(1, 127)):
        assert HeadRef.parse(str(ref)) == ref and resolve_heads(str(ref), handle) == [ref]
    assert head_name(HeadRef(1, 5), handle) == "L1.H5 (five)" and resolve_heads(head_name(HeadRef(1, 5), handle), handle) == [HeadRef(1, 5)]
    assert parse_heads("L1.H5 (five), L1.QK0 (heads 0-31), L1.A3, L1.A0-3, L1.QK1-2, L1.H0-127, L1:five") == [
        "L1.H5", "L1.QK0", "L1.A3", "L1.A0-3", "L1.QK1-2", "L1.H0-127", "L1:five"]
    assert HeadRef.parse("L1.H5 (five)") == HeadRef(1, 5)
    for bad in ("L1.A", "L1.QK", "L1.Q2", "L1.A3-1"):
        with pytest.raises(LorsaSurgeryError):
            parse_heads(bad)
    for one_head in ("L1.A2", "L1.QK2", "L1.H0-3"):
        with pytest.raises(LorsaSurgeryError, match="is not one head"):
            HeadRef.parse(one_head)

    # What `heads classify` prints, MHSA heads (L1.A0) and QK groups (L1.QK0 (heads 0-31)), names the heads it says.
    model_dir, lorsa_dir = tiny_folders(tmp_path)
    result = cli("heads", "classify", model_dir, "--lorsa", f"1={lorsa_dir}", "-n", "2", "--items", "5", "--block", "16")
    assert result.exit_code == 0, result.output
    groups = re.findall(r"(L1\.QK(\d+)) \(heads (\d+)-(\d+)\)", result.output)
    mhsa = re.findall(r"L1\.A\d+", result.output)
    assert len(groups) == 4 and len(mhsa) == 4
    for name, _, first, last in groups:
        assert resolve_heads(name, handle) == [HeadRef(1, i) for i in range(int(first), int(last) + 1)]
    bare = splice_of(tiny("llama"), bare=True)  # the printed MHSA heads name those of the unspliced attention
    assert [split_heads(name, bare)[1] for name in mhsa] == [heads_of(h) for h in range(4)]


def test_qk_groups_resolve_to_their_heads():
    model, handle = spliced()  # 128 heads in 4 QK groups of 32
    assert resolve_heads("L1.QK2", handle) == heads_of(2)
    assert resolve_heads("L1.QK1-2,L1.H40", handle) == heads_of(1) + heads_of(2)  # no repeats
    with pytest.raises(LorsaSurgeryError, match=r"Unknown QK group L1.QK4: the Lorsa module at layer 1 has 4 QK groups \(0..3\)"):
        resolve_heads("L1.QK4", handle)
    handle.unsplice()
    odd = Lorsa(LorsaConfig(d_model=64, n_qk_heads=2, d_qk_head=16, n_ov_heads=24, top_k=4))  # groups of 12
    handle = splice(model, {LAYER: odd})
    assert resolve_heads("L1.QK1", handle) == [HeadRef(1, i) for i in range(12, 24)]


def test_mhsa_heads_resolve_through_exact_copies_and_nowhere_else():
    model = tiny("llama")
    with splice(model, {LAYER: exact_copy(model, LAYER)}) as handle:
        assert resolve_heads("L1.A2", handle) == resolve_heads("L1.QK2", handle) == heads_of(2)
        assert resolve_heads("L1.A0-1", handle) == heads_of(0) + heads_of(1)
        with pytest.raises(LorsaSurgeryError, match=r"Unknown MHSA head L1.A4: the attention at layer 1 has 4 heads \(0..3\)"):
            resolve_heads("L1.A4", handle)
        assert split_heads("L1.A2,L2.A1", handle) == (heads_of(2), [HeadRef(2, i) for i in range(32, 64)])
        with pytest.raises(LorsaSurgeryError, match="Layer 2 carries no Lorsa module"):
            resolve_heads("L2.A1", handle)  # only interventions act on the original attention
    with splice(model, {LAYER: sparse_module(model)}):  # top-K: no longer exact
        with pytest.raises(LorsaSurgeryError, match=r"L1.A2 is an MHSA head, and the Lorsa module at layer 1 is not an exact "
                                                    r"copy .* \(--lorsa 1=from-attention, .*\) or leave layer 1 unspliced"):
            InterventionSet([Ablate("L1.A2")]).applied(model).__enter__()
    with pytest.raises(LorsaSurgeryError, match=r"Layer 7 is out of range: the model has 3 layers"):
        InterventionSet([Ablate("L7.A2")]).applied(model).__enter__()
    for steer in (dict(clamp=1.0), dict(add=1.0), dict(scale=2.0, add=1.0)):
        with pytest.raises(LorsaSurgeryError, match=r"Only scale steers an MHSA head \(L1.A2\)"):
            Steer("L1.H3,L1.A2", **steer)


# ---- the same edit three ways -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("mode", ["replace", "exact"])
@torch.no_grad()
def test_an_mhsa_head_ablated_through_its_copy_directly_and_by_hand_agree(family, mode):
    """llama and qwen2 have grouped-query attention (4 heads, 2 key-value heads), qwen2 with q/k/v biases; gpt2's
    projection is a Conv1D, gpt_neox's is called dense."""
    model = tiny(family)
    ids = torch.randint(3, 97, (2, 9))
    clean = model(ids).logits
    hand, hand_some = by_hand(model, family, ids, 2), by_hand(model, family, ids, 1, slice(2, 5))
    direct = run(model, ids, [Ablate("L1.A2")])
    direct_some = run(model, ids, [Ablate("L1.A1", positions="2:5")])
    with splice(model, {LAYER: exact_copy(model, LAYER)}, mode=mode):
        copy, copy_some = run(model, ids, [Ablate("L1.A2")]), run(model, ids, [Ablate("L1.A1", positions="2:5")])
    assert (hand - clean).abs().max() > 1e-2 and (hand_some - clean).abs().max() > 1e-2
    for ours in (direct, copy):
        assert (ours - hand).abs().max() < 1e-5
    for ours in (direct_some, copy_some):
        assert (ours - hand_some).abs().max() < 1e-5
    assert torch.equal(run(model, ids, [Steer("L1.A3", scale=1.0)]), clean)  # untouched heads come back bit for bit


@torch.no_grad()
def test_scale_patch_and_mean_ablation_act_on_the_attention_as_on_its_copy():
    model = tiny("llama")
    ids, other = torch.randint(3, 97, (2, 9)), torch.randint(3, 97, (2, 9))
    with splice(model, {LAYER: exact_copy(model, LAYER)}) as handle:
        source = cache_run(model, other, "L1.A1")  # patch sources and means come through a copy
        means = {str(ref): 0.1 * (ref.index % 7) for ref in heads_of(3)}
        records = [Steer("L1.A2", scale=-2.0, positions=[0, 4, -1]), Patch("L1.A1", source=source, positions="3:"),
                   Ablate("L1.A3", how="mean", means=means)]
        copy = run(model, ids, records)
        patched_back = run(model, other, [Ablate("L1.A1"), Patch("L1.A1", source=source)])
        clean_other = model(other).logits
    assert (copy - model(ids).logits).abs().max() > 1e-2
    assert (run(model, ids, records) - copy).abs().max() < 1e-5
    assert (patched_back - clean_other).abs().max() < 1e-5
    assert (run(model, other, [Ablate("L1.A1"), Patch("L1.A1", source=source)]) - clean_other).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["replace", "exact"])
@torch.no_grad()
def test_generation_with_mhsa_heads_directly_is_generation_through_the_copy(mode):
    model = tiny("llama")
    records = InterventionSet([Steer("L1.A2", scale=-3.0, positions="generated"), Ablate("L1.A1,L1.A3", positions=[0, 2, -1])])
    prompts = [torch.randint(3, 97, (n,)) for n in (8, 5)]
    ids, mask = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 8 - len(p) :], mask[i, 8 - len(p) :] = p, 1
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)

    def runs():
        with records.applied(model):
            return ([model.generate(p[None], **gen)[0, len(p) :] for p in prompts]
                    + [model.generate(p[None], use_cache=False, **gen)[0, len(p) :] for p in prompts]
                    + list(model.generate(ids, attention_mask=mask, **gen)[:, 8:]))

    direct = runs()
    with splice(model, {LAYER: exact_copy(model, LAYER)}, mode=mode):
        copy = runs()
    plain = [model.generate(p[None], **gen)[0, len(p) :] for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(direct, copy))
    assert all(torch.equal(direct[i], direct[i + 2]) and torch.equal(direct[i], direct[i + 4]) for i in range(2))
    assert any(not torch.equal(a, b) for a, b in zip(direct, plain))


# ---- the command line ---------------------------------------------------------------------------------------------


def family_folder(tmp_path, family: str) -> str:
    tiny(family).save_pretrained(tmp_path / family)
    char_tokenizer().save_pretrained(tmp_path / family)
    return str(tmp_path / family)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cli_ablates_an_mhsa_head_through_from_attention(tmp_path, family):
    model_dir = family_folder(tmp_path, family)
    model, tok = load_model(model_dir)
    ids = next(iter(token_windows(tok, [TEXT], 256)))
    loss = lambda logits: float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))
    with torch.no_grad():
        direct = run(model, ids, [Ablate("L1.A2")])
        assert (direct - by_hand(model, family, ids, 2)).abs().max() < 1e-5
    result = cli("ablate", model_dir, "--lorsa", "1=from-attention", "--heads", "L1.A2", "--prompt", TEXT, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["effects"][0]
    assert row["loss_after"] == pytest.approx(loss(direct), rel=1e-5) and row["loss_after"] != row["loss_before"]

    for cache in ([], ["--no-cache"]):
        out = cli("generate", model_dir, "--lorsa", "1=from-attention", "--ablate", "L1.A2", "--prompt", "abc",
                  "--max-new-tokens", "8", *cache)
        assert out.exit_code == 0, out.output
        with InterventionSet([Ablate("L1.A2")]).applied(model):
            expected = "abc" + generate_text(model, tok, "abc", max_new_tokens=8, use_cache=not cache)
        assert out.stdout == expected + "\n"


# ---- the host model's state ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_the_host_model_carries_one_library_attribute():
    model = tiny("llama")
    before = set(model.__dict__)
    ids = torch.randint(3, 97, (1, 6))
    handle = splice(model, {LAYER: sparse_module(model)})
    chosen = InterventionSet([Steer("L1.H3", clamp=2.0, positions="generated"), Ablate("L2.A1")])
    with chosen.applied(model):
        # While a set is applied generate() is wrapped on the instance, and only then (edits._Prompts says why).
        assert set(model.__dict__) - before == {"_lorsa", "generate"}
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert model._lorsa.splice is handle and model._lorsa.prompts is not None
    assert set(model.__dict__) - before == {"_lorsa"} and model._lorsa.prompts is None
    chosen.attach(handle)
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    handle.unsplice()  # takes the attached set off too
    assert set(model.__dict__) == before
    with InterventionSet([Ablate("L1.A2")]).applied(model):  # an unspliced model: MHSA heads only
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert set(model.__dict__) == before and not any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---- the real model -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_ablate_l18_a6_through_from_attention_is_ablating_head_6(smollm2, smollm2_gguf):
    model, tok = smollm2
    text = "When Mary and John went to the store, John gave a drink to"
    ids = next(iter(token_windows(tok, [text], 256)))  # as `lorsa-surgery ablate` reads the prompt
    hd = model.config.head_dim

    def zero(module, args):
        x = args[0].clone()
        x[..., 6 * hd : 7 * hd] = 0
        return (x,)

    with torch.no_grad():
        remover = model.model.layers[18].self_attn.o_proj.register_forward_pre_hook(zero)
        hand = model(ids).logits
        remover.remove()
        direct = run(model, ids, [Ablate("L18.A6")])
        with splice(model, {18: exact_copy(model, 18)}, mode="exact"):
            copy = run(model, ids, [Ablate("L18.A6")])
    assert (hand - model(ids).logits).abs().max() > 1e-2
    assert (direct - hand).abs().max() < 1e-4 and (copy - hand).abs().max() < 1e-4

    args = [smollm2_gguf, "--lorsa", "18=from-attention"]
    result = cli("ablate", *args, "--heads", "L18.A6", "--prompt", text, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["effects"][0]
    assert row["loss_after"] == pytest.approx(float(F.cross_entropy(direct[0, :-1], ids[0, 1:])), rel=1e-4)
    out = cli("generate", *args, "--ablate", "L18.A6", "--prompt", text, "--max-new-tokens", "8")
    assert out.exit_code == 0, out.output
    with InterventionSet([Ablate("L18.A6")]).applied(model):
        expected = text + generate_text(model, tok, text, max_new_tokens=8)
    assert out.stdout == expected + "\n"
