"""Head refs, intervention records and sets: known answers, generate() with the KV cache and padding, JSON, attach."""

import json
import math

import pytest
import torch

from lorsa_surgery import Lorsa, LorsaSurgeryError
from lorsa_surgery.analysis.attribution import logit_attribution
from lorsa_surgery.interventions.heads import HeadRef, head_name, parse_heads, resolve_heads
from lorsa_surgery.interventions.edits import (
    Ablate, InterventionSet, Patch, Recorder, Steer, parse_positions, parse_steer, position_mask,
)
from lorsa_surgery.interventions.patching import cache_run
from lorsa_surgery.host.splicing import splice
from lorsa_surgery.host.arch import exact_copy
from test_splice import tiny, sparse_module

LAYER = 1
HEAD_DIM = 16  # tiny("llama"): 4 MHSA heads of width 16, so from_attention gives 4 groups of 32 rank-1 heads


def group(h: int) -> str:
    """The rank-1 heads of a from_attention module that make up MHSA head h."""
    return f"L{LAYER}.H{2 * HEAD_DIM * h}-{2 * HEAD_DIM * (h + 1) - 1}"


def spliced(mode="replace", family="llama"):
    model = tiny(family)
    lorsa = sparse_module(model)
    lorsa.catalog = {5: {"label": "five", "note": "a test head"}, 9: {"label": "pair"}, 11: {"label": "pair"}}
    return model, splice(model, {LAYER: lorsa}, mode=mode)


# ---- head refs and positions ---------------------------------------------------------------------------------


def test_head_refs_parse_and_resolve():
    model, handle = spliced()
    assert parse_heads("L1.H3, L1:five") == ["L1.H3", "L1:five"]
    assert parse_heads([HeadRef(1, 4), "L1.H2-3"]) == ["L1.H4", "L1.H2-3"]
    assert resolve_heads("L1.H2-4,L1.H3,L1:pair,L1:five", handle) == [HeadRef(1, i) for i in (2, 3, 4, 9, 11, 5)]
    assert head_name(HeadRef(1, 5), handle) == "L1.H5 (five)" and head_name(HeadRef(1, 6), handle) == "L1.H6"
    for bad, message in [
        ("H3", "not a head"), ("L1.H4-2", "ends before"), ([], "No heads"),
        ("L1.H128", "Unknown head L1.H128: the Lorsa module at layer 1 has 128 heads"),
        ("L2.H0", "Layer 2 carries no Lorsa"), ("L1:induction", "No head of layer 1 is labelled 'induction' .*five, pair"),
    ]:
        with pytest.raises(LorsaSurgeryError, match=message):
            resolve_heads(bad, handle)


def test_position_selectors():
    assert parse_positions("all") == "all" and parse_positions(3) == [3] and parse_positions("2,5") == [2, 5]
    assert parse_positions(slice(2, None)) == "2:" and parse_positions("-3:") == "-3:" and parse_positions(range(1, 3)) == [1, 2]
    for bad in ("first", "1:2:3:4", "1:5:0", True, 2.5):
        with pytest.raises(LorsaSurgeryError):
            parse_positions(bad)
    # Two rows, left padded: row 0 is a 4-token prompt plus 2 generated tokens, row 1 a 2-token prompt.
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    lengths = torch.tensor([4, 2])
    sel = lambda spec: position_mask(parse_positions(spec), pos, lambda: lengths)
    assert sel("all") is None
    assert sel("generated").tolist() == [[False] * 4 + [True] * 2, [False] * 4 + [True] * 2]
    assert sel("prompt").tolist() == [[True] * 4 + [False] * 2, [True] * 4 + [False] * 2]
    assert sel([-1]).tolist() == [[False, False, False, True, False, False], [False, False, False, True, False, False]]
    assert sel("1:5:2").tolist() == [[False, True, False, True, False, False], [False, False, False, True, False, True]]
    assert sel("-2:")[0].tolist() == [False, False, True, True, True, True]


# ---- the known answer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replace", "exact"])
@torch.no_grad()
def test_known_answer_mhsa_head_ablation_and_patch(mode):
    """With an exact from_attention module, ablating the 32 rank-1 heads of MHSA head h is zeroing head h in the
    original (computed by hand on its o_proj input); other groups leave head h's contribution alone; patching the
    group back from a clean run restores the clean logits."""
    model = tiny("llama")
    ids = torch.randint(3, 97, (2, 9))
    o_proj = model.model.layers[LAYER].self_attn.o_proj

    def zeroing(heads):
        def pre_hook(module, args):
            x = args[0].clone()
            for h in heads:
                x[..., h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
            return (x,)

        remover = o_proj.register_forward_pre_hook(pre_hook)
        out = model(ids).logits
        remover.remove()
        return out

    clean, without_1, without_2 = model(ids).logits, zeroing([1]), zeroing([2])
    layer_out = {}
    with splice(model, {LAYER: exact_copy(model, LAYER)}, mode=mode) as handle:
        handle[LAYER].register_forward_hook(lambda m, a, out: layer_out.__setitem__("out", out[0]))
        run = lambda records: _run(model, ids, records, layer_out)
        ablated_1, out_1 = run([Ablate(group(1))])
        ablated_2, out_2 = run([Ablate(group(2))])
        _, out_12 = run([Ablate([group(1), group(2)])])
        _, out_none = run([])
        restored, _ = run([Ablate(group(1)), Patch(group(1), source=cache_run(model, ids, group(1)))])
    assert (ablated_1 - without_1).abs().max() < 1e-4
    assert (ablated_2 - without_2).abs().max() < 1e-4
    assert (ablated_1 - clean).abs().max() > 1e-2 and (ablated_1 - ablated_2).abs().max() > 1e-2
    head_1 = out_none - out_1  # head 1's contribution to the layer output
    assert (out_2 - out_12 - head_1).abs().max() < 1e-5  # ablating head 2 does not touch head 1's contribution
    assert (restored - clean).abs().max() < 1e-4


def _run(model, ids, records, layer_out):
    with InterventionSet(records).applied(model):
        logits = model(ids).logits
    return logits, layer_out["out"]


# ---- generate() -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replace", "exact"])
@torch.no_grad()
def test_steered_activation_reads_back_at_generated_positions(mode):
    model, handle = spliced(mode)
    prompt = torch.randint(3, 97, (1, 7))
    with Recorder(model, "L1.H5,L1.H6") as clean:
        model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    steer = InterventionSet([Steer("L1:five", clamp=2.5, positions="generated")])
    with steer.applied(model), Recorder(model, "L1.H5,L1.H6") as rec:
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    acts, before = rec.activations(), clean.activations()
    assert acts.shape == (1, 12, 2)  # the last generated token is never fed back
    assert torch.equal(acts[0, 7:, 0], torch.full((5,), 2.5))  # every decode step, at its absolute position
    assert torch.equal(acts[0, :7], before[0, :7])  # prompt untouched
    assert torch.equal(rec.activations("L1.H6")[0, :7], before[0, :7, 1])
    assert out.shape == (1, 13)


@torch.no_grad()
def test_large_steer_writes_the_heads_direct_logit_token_from_the_second_generated_token():
    """Clamped far above everything else, a head's output direction dominates the residual stream, so every token
    predicted at a steered position is the token its direct logit attribution promotes most."""
    model, handle = spliced()
    prompt = torch.randint(3, 97, (1, 6))
    plain = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for head in ("L1.H17", "L1.H40"):
        token = logit_attribution(model, head, k=1).promoted[0][0]
        with InterventionSet([Steer(head, clamp=300.0, positions="generated")]).applied(model):
            steered = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert steered[0, 6] == plain[0, 6]  # predicted at the prompt's last token, which is not steered
        assert steered[0, 7:].tolist() == [token] * 9 != plain[0, 7:].tolist()


@pytest.mark.parametrize("mode", ["replace", "exact"])
@torch.no_grad()
def test_same_tokens_with_and_without_cache_and_with_left_padding(mode):
    model, handle = spliced(mode)
    records = InterventionSet([
        Steer("L1:five", clamp=6.0, positions="generated"),
        Steer("L1.H7-40", scale=-2.0, add=0.5, positions="-3:"),
        Ablate("L1:pair,L1.H60-90", positions=[0, 2, -1]),
    ])
    prompts = [torch.randint(3, 97, (n,)) for n in (8, 5)]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 8 - len(p) :], mask[i, 8 - len(p) :] = p, 1
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with records.applied(model):
        singles = [model.generate(p[None], **gen)[0, len(p) :] for p in prompts]
        uncached = [model.generate(p[None], use_cache=False, **gen)[0, len(p) :] for p in prompts]
        padded = model.generate(ids, attention_mask=mask, **gen)[:, 8:]
        padded_uncached = model.generate(ids, attention_mask=mask, use_cache=False, **gen)[:, 8:]
    plain = [model.generate(p[None], **gen)[0, len(p) :] for p in prompts]
    for i in range(2):
        assert torch.equal(singles[i], uncached[i])
        assert torch.equal(singles[i], padded[i])
        assert torch.equal(singles[i], padded_uncached[i])
    assert any(not torch.equal(s, p) for s, p in zip(singles, plain))  # the set really acts


@torch.no_grad()
def test_beam_search_with_interventions_matches_uncached():
    model, handle = spliced()
    prompt = torch.randint(3, 97, (1, 6))
    gen = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    with InterventionSet([Steer("L1.H3-20", add=1.5, positions="generated")]).applied(model):
        assert torch.equal(model.generate(prompt, **gen), model.generate(prompt, use_cache=False, **gen))


# ---- scope, fast path, composition ------------------------------------------------------------------------------


def hooks_on(model: torch.nn.Module) -> int:
    """Every hook torch keeps on any module of the model, plus the instance-level generate() wrapper."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, kind)) for m in model.modules() for kind in kinds) + ("generate" in model.__dict__)


@torch.no_grad()
def test_unsplice_takes_attached_interventions_and_their_hooks_out():
    model = tiny("llama")
    ids = torch.randint(3, 97, (1, 8))
    original, before = model(ids).logits, hooks_on(model)
    handle = splice(model, {LAYER: sparse_module(model)})
    InterventionSet([Steer("L1.H3", clamp=2.0, positions="generated")]).attach(handle)
    model.generate(ids, max_new_tokens=2, do_sample=False)
    site = handle[LAYER]
    assert site.hooks and hooks_on(model) == before + 1  # the prompt tracker wraps generate()
    handle.unsplice()
    assert hooks_on(model) == before == 0 and site.hooks == [] and handle.interventions is None
    assert not {"generate", "_lorsa"} & set(model.__dict__)
    assert torch.equal(model(ids).logits, original)


def test_a_failed_report_leaves_no_hook_behind(monkeypatch):
    from lorsa_surgery.host import metrics

    model = tiny("llama")

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # a user stopping the measurement half-way

    monkeypatch.setattr(metrics, "lm_loss", broken)
    with pytest.raises(KeyboardInterrupt):
        metrics.splice_report(model, None, {LAYER: sparse_module(model)}, ["text"])
    assert hooks_on(model) == 0 and type(model.model.layers[LAYER].self_attn).__name__ == "LlamaAttention"


@torch.no_grad()
def test_no_hooks_without_interventions_and_clean_exit():
    model, handle = spliced("exact")
    ids = torch.randint(3, 97, (1, 8))
    original = model(ids).logits
    with InterventionSet().applied(model):
        assert handle[LAYER].hooks == [] and "generate" not in model.__dict__
        assert torch.equal(model(ids).logits, original)
    outer, inner = InterventionSet([Ablate("L1.H1")]), InterventionSet([Steer("L1.H2", add=1.0)])
    with outer.applied(model):
        with inner.applied(handle):
            assert len(handle[LAYER].hooks) == 2
        assert len(handle[LAYER].hooks) == 1 and "generate" in model.__dict__
        with pytest.raises(RuntimeError):
            with inner.applied(model):
                raise RuntimeError("boom")
        assert len(handle[LAYER].hooks) == 1
    assert handle[LAYER].hooks == [] and "generate" not in model.__dict__ and model._lorsa.prompts is None
    assert torch.equal(model(ids).logits, original)


@torch.no_grad()
def test_records_compose_in_order_and_mean_resample_write_what_they_say():
    model, handle = spliced()
    ids = torch.randint(3, 97, (2, 8))
    other = torch.randint(3, 97, (2, 8))
    source = cache_run(model, other, "L1.H3,L1.H4")
    sets = {
        "mean": InterventionSet([Ablate("L1.H3,L1.H4", how="mean", means={"L1.H3": 0.25, "L1.H4": -1.5})]),
        "resample": InterventionSet([Ablate("L1.H3,L1.H4", how="resample", source=source, positions="2:6")]),
        "then": InterventionSet([Steer("L1.H3", clamp=1.0)]) + Steer("L1.H3", scale=3.0, add=1.0),
    }
    with Recorder(model, "L1.H3,L1.H4") as clean:
        model(ids)
    seen = {}
    for name, s in sets.items():
        with s.applied(model), Recorder(model, "L1.H3,L1.H4") as rec:
            model(ids)
        seen[name] = rec.activations()
    assert torch.equal(seen["mean"][..., 0], torch.full((2, 8), 0.25)) and torch.equal(seen["mean"][..., 1], torch.full((2, 8), -1.5))
    assert torch.equal(seen["resample"][:, 2:6], source.dense()[:, 2:6])
    assert torch.equal(seen["resample"][:, :2], clean.activations()[:, :2])
    assert torch.equal(seen["then"][..., 0], torch.full((2, 8), 4.0))  # clamp to 1, then 3 * 1 + 1


# ---- files and persistence -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_json_round_trip_gives_the_same_run(tmp_path):
    model, handle = spliced()
    ids = torch.randint(3, 97, (2, 8))
    source = cache_run(model, torch.randint(3, 97, (2, 8)), "L1.H0-9")
    original = InterventionSet([
        Ablate("L1.H0-3", how="resample", source=source, positions="prompt"),
        Ablate("L1:pair", how="mean", means={"L1.H9": 0.1, "L1.H11": 0.2}),
        Steer("L1:five", add=2.0, scale=0.5, positions=[1, -1]),
        Patch("L1.H5-9", source=source, positions="1:7:2"),
    ])
    path = original.save(tmp_path / "set.json")
    loaded = InterventionSet.load(path)
    assert loaded.to_dict() == original.to_dict() == json.loads(path.read_text())
    assert loaded.to_dict()["interventions"][2] == {"type": "steer", "heads": ["L1:five"], "add": 2.0, "scale": 0.5, "positions": [1, -1]}
    with original.applied(model):
        a = model(ids).logits
    with loaded.applied(model):
        b = model(ids).logits
    assert torch.equal(a, b) and (a - model(ids).logits).abs().max() > 1e-3


@torch.no_grad()
def test_attach_persists_and_is_saved_with_the_patched_model(tmp_path):
    from lorsa_surgery.io.files import read_json
    from lorsa_surgery.publishing.patched import INTERVENTIONS_FILE, save_patched

    model, handle = spliced()
    ids = torch.randint(3, 97, (1, 8))
    plain = model(ids).logits
    chosen = InterventionSet([Ablate("L1.H0-40"), Steer("L1:five", clamp=3.0)])
    chosen.attach(model)
    assert handle.interventions is chosen
    steered = model(ids).logits
    assert (steered - plain).abs().max() > 1e-3
    with pytest.raises(LorsaSurgeryError, match="already has interventions"):
        InterventionSet([Ablate("L1.H1")]).attach(handle)
    save_patched(handle, tmp_path / "patched", base={"id": "tiny"})
    spec = read_json(tmp_path / "patched" / INTERVENTIONS_FILE)
    assert spec == chosen.to_dict()
    chosen.detach()
    assert handle.interventions is None and handle[LAYER].hooks == []
    assert torch.equal(model(ids).logits, plain)
    InterventionSet.from_dict(spec).attach(handle)  # what load_patched does
    assert torch.equal(model(ids).logits, steered)


def test_bad_input_fails_clearly():
    model, handle = spliced()
    with pytest.raises(LorsaSurgeryError, match="finite"):
        Steer("L1.H1", clamp=math.nan)
    with pytest.raises(LorsaSurgeryError, match="finite"):
        Steer("L1.H1", add=math.inf)
    with pytest.raises(LorsaSurgeryError, match="clamp alone"):
        Steer("L1.H1", clamp=1.0, add=1.0)
    with pytest.raises(LorsaSurgeryError, match="needs add, scale or clamp"):
        Steer("L1.H1")
    with pytest.raises(LorsaSurgeryError, match="Mean ablation needs means"):
        Ablate("L1.H1", how="mean")
    with pytest.raises(LorsaSurgeryError, match="zero, mean or resample"):
        Ablate("L1.H1", how="erase")
    with pytest.raises(LorsaSurgeryError, match="no mean for L1.H2"):
        with InterventionSet([Ablate("L1.H1-2", how="mean", means={"L1.H1": 0.0})]).applied(model):
            pass
    with pytest.raises(LorsaSurgeryError, match="carries no Lorsa"):
        with InterventionSet([Ablate("L0.H1")]).applied(model):
            pass
    assert handle[LAYER].hooks == []
    with pytest.raises(LorsaSurgeryError, match="no Lorsa modules spliced"):
        InterventionSet([Ablate("L1.H1")]).applied(tiny("llama")).__enter__()
    short = cache_run(model, torch.randint(3, 97, (1, 4)), "L1.H1")
    with pytest.raises(LorsaSurgeryError, match="covers positions up to 3, but position 7"):
        with InterventionSet([Patch("L1.H1", source=short)]).applied(model):
            model(torch.randint(3, 97, (1, 8)))
    with pytest.raises(LorsaSurgeryError, match="hold no L1.H2"):
        with InterventionSet([Patch("L1.H2", source=short)]).applied(model):
            pass
    with pytest.raises(LorsaSurgeryError, match="type of ablate, steer, patch"):
        InterventionSet.from_dict({"format": "lorsa-surgery.interventions", "interventions": [{"type": "boost"}]})
    with pytest.raises(LorsaSurgeryError, match="Unknown field"):
        InterventionSet.from_dict({"format": "lorsa-surgery.interventions", "interventions": [{"type": "steer", "heads": "L1.H1", "add": 1, "gain": 2}]})
    with pytest.raises(LorsaSurgeryError, match="Not a lorsa-surgery intervention spec"):
        InterventionSet.from_dict({"interventions": []})


def test_command_line_steer_syntax():
    assert parse_steer("L1.H5=3") == Steer("L1.H5", clamp=3.0)
    assert parse_steer("L1:five+=-0.5") == Steer("L1:five", add=-0.5)
    assert parse_steer("L1.H2-4*=2") == Steer("L1.H2-4", scale=2.0)
    for bad in ("L1.H5", "L1.H5=x", "=3"):
        with pytest.raises(LorsaSurgeryError):
            parse_steer(bad)


# ---- command line -----------------------------------------------------------------------------------------------------


def char_tokenizer():
    """A character-level tokenizer over the tiny models' 97 ids: <pad>, <s>, then printable ASCII."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")


def tiny_folders(tmp_path):
    """A tiny Llama with a character tokenizer, and its layer-1 sparse Lorsa (with a catalog), as folders."""
    model = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    lorsa = sparse_module(model)
    lorsa.catalog = {5: {"label": "five", "note": "a test head"}, 17: {"label": "tee"}}
    lorsa.save_pretrained(tmp_path / "lorsa")
    return str(tmp_path / "model"), str(tmp_path / "lorsa")


def cli(*args):
    from click.testing import CliRunner

    from lorsa_surgery.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_ablate_steer_patch_and_save(tmp_path):
    from lorsa_surgery.host.models import load_model
    from lorsa_surgery.interventions.patching import effect

    model_dir, lorsa_dir = tiny_folders(tmp_path)
    common = [model_dir, "--lorsa", f"1={lorsa_dir}", "--prompt", "The cat sat on the mat."]
    result = cli("ablate", *common, "--heads", "L1.H0-63", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["effects"][0]
    model, tok = load_model(model_dir)
    handle = splice(model, {LAYER: Lorsa.from_pretrained(lorsa_dir)})
    expected = effect(handle, tok, ["The cat sat on the mat."], InterventionSet([Ablate("L1.H0-63")]))[0]
    assert row["tokens"] == expected.tokens == 22
    assert math.isclose(row["loss_after"], expected.loss_after, rel_tol=1e-5) and row["loss_after"] != row["loss_before"]
    assert row["kl"] > 0

    result = cli("steer", *common, "--heads", "L1:tee", "--clamp", "300", "--positions", "generated", "--save",
                 tmp_path / "steered", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["effects"][0]
    assert row["input"] == "The cat sat on the mat." and row["tokens"] == 22
    assert row["loss_after"] == pytest.approx(row["loss_before"], abs=1e-6) and row["kl"] < 1e-6  # nothing generated: no effect
    spec = json.loads((tmp_path / "steered" / "interventions.json").read_text())
    assert spec["interventions"] == [{"type": "steer", "heads": ["L1:tee"], "clamp": 300.0, "positions": "generated"}]
    # The saved model carries the steer: from the second generated token on, L1.H17's top logit token 'T'.
    result = cli("generate", tmp_path / "steered", "--base", model_dir, "--prompt", "abc", "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()[4:] == "TTTTT"
    result = cli("ablate", tmp_path / "steered", "--base", model_dir, "--heads", "L1.H3", "--save", tmp_path / "both")
    assert result.exit_code == 0, result.output
    types = [r["type"] for r in json.loads((tmp_path / "both" / "interventions.json").read_text())["interventions"]]
    assert types == ["steer", "ablate"]

    result = cli("patch", *common, "--heads", "L1.H0-3", "--source", "The dog sat on the rug.", "--sweep",
                 "--metric", "probability", "--token", "m", "--json")
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    assert len(sweep["values"]) == 4 and len(sweep["values"][0]) == 23 and sweep["metric"] == f"p[{tok('m').input_ids[0]}]"

    result = cli("ablate", *common, "--heads", "L1.H999")
    assert result.exit_code != 0 and "Unknown head L1.H999" in result.output and "Traceback" not in result.output


def test_cli_generate_with_interventions(tmp_path):
    """Clamping L1.H17 hugely makes every token predicted its top direct-logit token, 'T'."""
    model_dir, lorsa_dir = tiny_folders(tmp_path)
    assert logit_attribution(splice(tiny("llama"), {LAYER: Lorsa.from_pretrained(lorsa_dir)}), "L1.H17", k=1).promoted[0][0] == ord("T") - 30
    common = ["generate", model_dir, "--lorsa", f"1={lorsa_dir}", "--prompt", "abc", "--max-new-tokens", "6"]
    plain = cli(*common)
    steered = cli(*common, "--steer", "L1:tee=300")
    assert plain.exit_code == 0 and steered.exit_code == 0, steered.output
    assert steered.stdout.strip() == "abcTTTTTT" != plain.stdout.strip()
    InterventionSet([Steer("L1.H17", clamp=300.0)]).save(tmp_path / "set.json")
    from_file = cli(*common, "--interventions", tmp_path / "set.json", "--no-cache")
    assert from_file.stdout == steered.stdout
    refused = cli("generate", model_dir, "--prompt", "abc", "--ablate", "L1.H3")
    assert refused.exit_code != 0 and "pass --lorsa" in refused.output
