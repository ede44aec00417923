"""Head families: detectors rank planted heads first, find SmolLM2's MHSA induction heads through the exact copy, and
run on the shipped layer-3 module; the causal check of a family against a matched random control."""

import pytest
import torch

from lorsa_surgery import Lorsa, LorsaConfig
from lorsa_surgery.analysis.families import (ATTENTION_THRESHOLD, FAMILIES, FamilyScores, catalog_entries, detect, random_probe, repeated_probe, score_heads,
                                    word_tokens)

D_TOKEN, ROT, CONTENT = 64, 16, 64
G = 40  # heads per QK group; the induction group copies 40 tokens, one each


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def _planted(words: list[int], embed: torch.Tensor) -> Lorsa:
    """Four QK groups of 40 heads over inputs x_t = [E(token t), E(token t-1), is-BOS, 0...]:
    group 0 attends to the previous token (query and key biases whose rotary phases meet at offset 1), group 1 to
    BOS (its key reads the BOS flag), group 2 from the current token to the position after its earlier occurrence
    (query reads E(token t), key reads E(token t-1)) and head j copies token j, group 3 is random."""
    d = 2 * D_TOKEN + 64
    lorsa = Lorsa(LorsaConfig(d_model=d, n_qk_heads=4, d_qk_head=ROT + CONTENT, n_ov_heads=4 * G, act_fn="relu",
                              rotary_dim=ROT, rotary_base=10.0, attn_scale=1.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (lorsa.W_Q, lorsa.W_K, lorsa.b_Q, lorsa.b_K):
            p.zero_()
        phase = torch.zeros(1, 1, 4, ROT + CONTENT)
        phase[0, 0, 0, :ROT] = 6.0
        lorsa.b_Q[0] = phase[0, 0, 0]
        lorsa.b_K[0] = lorsa._rotate(phase, torch.ones(1, 1, dtype=torch.long))[0, 0, 0]  # meets the query at offset 1
        lorsa.b_Q[1, ROT:] = 1.0
        lorsa.W_K[1, 2 * D_TOKEN, ROT:] = 20.0  # the BOS flag
        eye = torch.eye(D_TOKEN) * 6.0
        lorsa.W_Q[2, :D_TOKEN, ROT:] = eye
        lorsa.W_K[2, D_TOKEN : 2 * D_TOKEN, ROT:] = eye
        lorsa.W_V[: 2 * G] = 0.0
        lorsa.b_V[: 2 * G] = 1.0
        lorsa.W_V[2 * G : 3 * G] = 0.0
        lorsa.W_V[2 * G : 3 * G, :D_TOKEN] = embed[words[:G]]
        lorsa.b_V[2 * G :] = 0.0
        lorsa.W_O[2 * G : 3 * G] = 0.0
        lorsa.W_O[2 * G : 3 * G, :D_TOKEN] = embed[words[:G]]
    return lorsa


def _inputs(probe, embed):
    ids = probe.input_ids
    prev = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], 1)
    x = torch.zeros(*ids.shape, 2 * D_TOKEN + 64)
    x[..., :D_TOKEN], x[..., D_TOKEN : 2 * D_TOKEN] = embed[ids], embed[prev]
    x[:, 1:, D_TOKEN : 2 * D_TOKEN] = embed[prev[:, 1:]]
    x[:, 0, D_TOKEN : 2 * D_TOKEN] = 0.0
    x[:, 0, 2 * D_TOKEN] = 1.0
    return x


@pytest.mark.slow
def test_detectors_rank_planted_heads_first(tokenizer):
    torch.manual_seed(1)
    embed = torch.nn.functional.normalize(torch.randn(len(tokenizer), D_TOKEN), dim=-1)
    words = word_tokens(tokenizer)[:G]
    lorsa = _planted(words, embed)
    logits = lambda directions: directions[..., :D_TOKEN].float() @ embed.T  # noqa: E731 - the toy unembedding
    group = {"previous_token": 0, "attention_sink": 1, "induction": 2}
    probes = {"previous_token": random_probe(tokenizer, 8, 40, 0, "previous", words),
              "attention_sink": random_probe(tokenizer, 8, 40, 0, "sink", words),
              "induction": repeated_probe(tokenizer, 8, 20, 0, "induction", words)}
    results = {}
    for family, probe in probes.items():
        scores, attention, counted = score_heads(lorsa, _inputs(probe, embed), probe, logits)
        planted = torch.arange(group[family] * G, (group[family] + 1) * G)
        others = torch.tensor([h for h in range(4 * G) if h not in planted.tolist()])
        fired = planted[counted[planted] > 0]
        assert len(fired) >= (G // 2 if family == "induction" else G)  # each induction head copies one token
        assert scores[fired].min() > scores[others].max(), family
        # Every planted head fires weakly off its own token too (relu, no top-K), which dilutes but does not hide it.
        assert scores[fired].mean() >= FAMILIES[family].threshold, family
        results[family] = FamilyScores(family, FAMILIES[family].threshold, scores, attention, counted, int(probe.query.sum()))
    labels = catalog_entries(results)
    assert {labels[h]["label"] for h in range(G)} == {"previous_token"}
    assert labels[results["induction"].members()[0]]["label"] == "induction"
    assert torch.equal(results["previous_token"].attention, results["previous_token"].scores)


@pytest.mark.slow
def test_heads_that_read_like_induction_without_promoting_their_token_are_labelled_by_attention(tokenizer):
    """The planted induction group with each head's output turned to another word: it attends exactly as before, so
    its attention part stays high, but its score falls under the threshold; the catalog says `induction_attention`."""
    torch.manual_seed(1)
    embed = torch.nn.functional.normalize(torch.randn(len(tokenizer), D_TOKEN), dim=-1)
    words = word_tokens(tokenizer)[: 2 * G]
    lorsa = _planted(words, embed)
    with torch.no_grad():
        lorsa.W_O[2 * G : 3 * G, :D_TOKEN] = embed[words[G:]]  # promotes a word that never follows in the probe
    logits = lambda directions: directions[..., :D_TOKEN].float() @ embed.T  # noqa: E731 - the toy unembedding
    probe = repeated_probe(tokenizer, 8, 20, 0, "induction", words[:G])
    scores, attention, counted = score_heads(lorsa, _inputs(probe, embed), probe, logits)
    fs = FamilyScores("induction", FAMILIES["induction"].threshold, scores, attention, counted, int(probe.query.sum()))
    fired = [h for h in range(2 * G, 3 * G) if counted[h] > 0]
    assert len(fired) >= G // 2 and not fs.members()
    assert set(fs.attending()) == set(fired) and attention[fired].min() > ATTENTION_THRESHOLD
    assert set(fs.attending()) <= set(range(2 * G, 3 * G))  # the other groups read elsewhere
    labels = catalog_entries({"induction": fs})
    assert {labels[h]["label"] for h in fs.attending()} == {"induction_attention"}
    assert labels[fs.attending()[0]]["note"].startswith("detected: induction attention ")


@pytest.mark.slow
def test_mhsa_induction_heads_of_smollm2_are_found_through_the_exact_copy(smollm2):
    model, tokenizer = smollm2
    induction = detect(model, tokenizer, 23, None, ["induction"], n_prompts=8)["induction"]
    assert induction.members()[0] == 2 and induction.scores[2] > 0.3  # L23.A2
    early = detect(model, tokenizer, 3, None, ["induction", "previous_token"], n_prompts=8)
    assert early["induction"].scores.max() < 0.05  # no induction this early


@pytest.mark.slow
def test_every_detector_runs_on_the_shipped_layer3_module(smollm2):
    from lorsa_surgery.publishing.patched import module_for

    model, tokenizer = smollm2
    lorsa = module_for(model, 3, "default")
    results = detect(model, tokenizer, 3, lorsa, n_prompts=4)
    assert list(results) == list(FAMILIES)
    for fs in results.values():
        assert fs.scores.shape == (1152,) and ((fs.scores >= 0) & (fs.scores <= 1)).all() and fs.queries > 0
    assert len(results["previous_token"].members()) >= 10  # layer 3 is full of previous-token heads


@pytest.mark.slow
def test_detect_writes_the_catalog_and_causal_ablates_a_labelled_family(smollm2_gguf, tmp_path):
    """The CLI end to end on a copy of the shipped layer-3 module: detect labels heads in its catalog, the labels name
    them in `heads causal`, and patching the ablated heads back restores the clean behaviour."""
    import json
    import shutil
    from pathlib import Path

    from click.testing import CliRunner

    import lorsa_surgery
    from lorsa_surgery import Lorsa
    from lorsa_surgery.cli import main

    folder = tmp_path / "L3"
    shutil.copytree(Path(lorsa_surgery.__file__).parent / "default_modules" / "smollm2-L3", folder)
    out = CliRunner().invoke(main, ["heads", "detect", "smollm2", "--lorsa", f"3={folder}", "--families",
                                    "previous_token,attention_sink", "-n", "4", "--write-catalog"])
    assert out.exit_code == 0, out.output
    assert "previous_token" in out.output and "labelled" in out.output
    catalog = Lorsa.from_pretrained(folder).catalog
    labelled = [h for h, e in catalog.items() if e["label"] == "previous_token"]
    assert len(labelled) >= 10 and all(catalog[h]["note"].startswith("detected: ") for h in labelled)

    out = CliRunner().invoke(main, ["heads", "causal", "smollm2", "--lorsa", f"3={folder}", "--family", "induction",
                                    "--heads", "L3:previous_token", "-n", "6", "--json"])
    assert out.exit_code == 0, out.output
    check = json.loads(out.output[out.output.index("{"):])
    assert len(check["heads"]) == len(labelled) and not set(check["heads"]) & set(check["control"])
    assert len(check["control"]) == len(check["heads"])
    assert check["restored"]["mean"] == pytest.approx(check["clean"]["mean"], abs=0.02)
    for key in ("clean", "ablated", "control_ablated", "effect"):
        assert check[key]["low"] <= check[key]["mean"] <= check[key]["high"]

    from lorsa_surgery.analysis.causal import family_words
    from lorsa_surgery.analysis.families import word_tokens

    out = CliRunner().invoke(main, ["heads", "causal", "smollm2", "--lorsa", f"3={folder}", "--family", "induction",
                                    "--heads", "L3:previous_token", "-n", "4", "--words", "family", "--json"])
    assert out.exit_code == 0, out.output
    check = json.loads(out.output[out.output.index("{"):])
    pool = int(check["behaviour"].split("drawn from the ")[1].split()[0])
    assert pool >= 20 and check["restored"]["mean"] == pytest.approx(check["clean"]["mean"], abs=0.02)
    model, tok = lorsa_surgery.load_model("smollm2")
    handle = lorsa_surgery.splice(model, {3: Lorsa.from_pretrained(folder)})
    heads = [int(h.split(".H")[1]) for h in check["heads"]]
    words = family_words(handle, 3, heads, tok)
    assert len(words) == pool and set(words) <= set(word_tokens(tok, len(tok)))
    scores = lorsa_surgery.analysis.attribution.logit_scores(handle, 3, heads[:1])[0]
    assert max(word_tokens(tok, len(tok)), key=lambda t: float(scores[t])) in words  # each head's best word is in


def test_provenance_of_host_started_heads_lies_in_one_mhsa_head_and_of_random_heads_does_not():
    import transformers as tf

    from lorsa_surgery.host.arch import exact_copy, from_host_subspaces, provenance

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                               num_key_value_heads=2, num_hidden_layers=2))
    x = torch.randn(2, 12, 64)
    for lorsa in (exact_copy(model, 1), from_host_subspaces(model, 1, 4, 96, x)):
        shares = provenance(model, 1, lorsa)
        assert shares["output"].shape == (lorsa.cfg.n_ov_heads, 4) and shares["value"].shape == (lorsa.cfg.n_ov_heads, 2)
        assert torch.allclose(shares["output"].sum(1), torch.ones(lorsa.cfg.n_ov_heads), atol=1e-5)
        assert shares["output"].max(1).values.min() > 0.999 and shares["value"].max(1).values.min() > 0.999
    spread = provenance(model, 1, Lorsa(LorsaConfig(d_model=64, n_qk_heads=4, d_qk_head=16, n_ov_heads=96)))["output"]
    assert (spread.max(1).values < 0.9).float().mean() > 0.9


@pytest.mark.slow
def test_head_families_example_runs_in_fast_mode(smollm2_gguf, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples" / "head_families.py"), "--fast",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| L3 Lorsa | 1152 |" in done.stdout and "causal checks" in done.stdout
    assert (tmp_path / "head_families.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layer, label", [(18, "induction_attention"), (23, "induction")])
def test_the_big_shipped_modules_carry_detected_labels_that_name_heads_and_reach_the_card(smollm2, tmp_path, layer, label):
    import lorsa_surgery as ls

    model, _ = smollm2
    lorsa = ls.module_for(model, layer, "default")
    induction = sorted(h for h, e in lorsa.catalog.items() if e["label"] == label)
    assert len(induction) >= 20 and all(lorsa.catalog[h]["note"].startswith("detected: ") for h in induction)
    handle = ls.splice(model, {layer: lorsa})
    try:
        assert [r.index for r in ls.resolve_heads(f"L{layer}:{label}", handle)] == induction
        card = (ls.save_patched(handle, tmp_path / "patched", base=ls.base_record("smollm2")) / "README.md").read_text()
    finally:
        ls.unsplice(model)
    assert f"L{layer}.H{induction[0]}" in card and f"| {label} | {len(induction)} | `L{layer}:{label}` |" in card


@pytest.mark.slow
def test_ablating_the_layer18_induction_family_costs_far_more_than_its_matched_control(smollm2):
    """The must-show of docs/heads.md on fresh prompts: the labelled family of the layer where SmolLM2's induction
    circuit runs is causal, beyond heads that fire as often, and patching it back restores the behaviour. These heads
    read the token to copy but do not promote it through the direct logits (`induction_attention`)."""
    import lorsa_surgery as ls
    from lorsa_surgery.analysis.causal import causal_check

    model, tok = smollm2
    with ls.splice(model, {18: ls.module_for(model, 18, "default")}) as handle:
        heads = [r.index for r in ls.resolve_heads("L18:induction_attention", handle)]
        check = causal_check(handle, tok, 18, "induction", heads, n_prompts=16)
    assert check.effect.low > 0.2 and check.control_effect.high < 0.1  # 0.418 against 0.001 on 64 prompts (docs/heads.md)
    assert check.restored.mean == pytest.approx(check.clean.mean, abs=0.01)

    from click.testing import CliRunner

    from lorsa_surgery.cli import main

    out = CliRunner().invoke(main, ["heads", "causal", "smollm2", "--lorsa", "18=default", "--family", "induction", "-n", "4"])
    assert out.exit_code == 0, out.output
    scored = [h for h, e in ls.module_for(None, 18, "default").catalog.items() if e["label"] == "induction"]
    assert f"{len(scored)} heads of layer 18" in out.output  # by default the family's own label
    assert f"also labels {len(heads)} heads induction_attention" in out.output and "--heads L18:induction_attention" in out.output


@pytest.mark.slow
def test_heads_ablated_throughout_shape_every_run_of_a_causal_check(smollm2_gguf):
    import lorsa_surgery as ls
    from lorsa_surgery import Lorsa
    from lorsa_surgery.analysis.causal import causal_check

    model, tok = ls.load_model("smollm2")
    handle = ls.splice(model, {2: ls.exact_copy(model, 2), 3: ls.module_for(model, 3, "default")})
    heads = list(range(0, 1152, 40))
    plain = causal_check(handle, tok, 3, "induction", heads, n_prompts=4)
    without_l2 = causal_check(handle, tok, 3, "induction", heads, n_prompts=4, also_ablate=["L2.H0-1151"])
    assert plain.also_ablated == [] and without_l2.also_ablated == ["L2.H0-1151"]
    assert without_l2.clean.mean != plain.clean.mean  # layer 2's attention is gone from the clean run too
    assert without_l2.restored.mean == pytest.approx(without_l2.clean.mean, abs=0.02)
    with pytest.raises(ls.LorsaSurgeryError, match="the family's own"):
        causal_check(handle, tok, 3, "induction", heads, n_prompts=4, also_ablate=["L3.H5"])


def test_causal_check_refuses_unknown_word_sources_before_running():
    from lorsa_surgery import LorsaSurgeryError
    from lorsa_surgery.analysis.causal import causal_check

    with pytest.raises(LorsaSurgeryError, match="words must be one of random, family"):
        causal_check(None, None, 3, "induction", [1], words="names")
    with pytest.raises(LorsaSurgeryError, match="Only the induction check"):
        causal_check(None, None, 3, "name_mover", [1], words="family")
