"""Publishing patched models: save, push with a card, load back by Hub id (pinned, offline), the CLI, faults, cards.

Everything runs against the local Hub server started in conftest.py, through the real client. The rendered
card is compared with tests/fixtures/card_snapshot.md; after an intended change to the card template or
to `lorsa_surgery.publishing.cards`, rewrite the snapshot with

    UPDATE_SNAPSHOTS=1 pytest tests/test_publish.py -k snapshot

and review its diff.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard
from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from lorsa_surgery import Lorsa, LorsaSurgeryError
from lorsa_surgery.cli import main
from lorsa_surgery.io.hub import pull, push_folder
from lorsa_surgery.interventions.edits import Ablate, InterventionSet
from lorsa_surgery.host.models import generate_text
from lorsa_surgery.publishing.patched import LOCAL_HINT, export_full, load_patched, read_root, save_patched
from lorsa_surgery.host.splicing import splice
from test_hub import _files
from test_splice import LAYER, sparse_module, tiny

IDS = torch.tensor([[3, 10, 42, 7, 19, 64, 2, 88]])
PROMPT = "w1 w8 w40 w5"
SNAPSHOT = Path(__file__).parent / "fixtures" / "card_snapshot.md"


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over <unk>, <eos> and w0..w94: the 97 ids of tiny()'s vocabulary, built offline."""
    words = ["<unk>", "<eos>", *(f"w{i}" for i in range(95))]
    backend = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def _push_base(tmp_path: Path, repo_id: str) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    """tiny("llama") and its tokenizer pushed as a plain transformers repo; (model, tokenizer, base record)."""
    model, tokenizer = tiny("llama"), _tokenizer()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    commit = push_folder(tmp_path / "base", repo_id)
    return model, tokenizer, {"id": repo_id, "revision": commit.oid}


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(IDS).logits


def _assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert (got - expected).abs().max().item() <= 1e-6


_FRESH_LOAD = f"""
import sys, torch
from lorsa_surgery.publishing.patched import load_patched
out, repo_id, revisions = sys.argv[1], sys.argv[2], sys.argv[3:]
with torch.no_grad():
    torch.save([load_patched(repo_id, revision=rev)[0](torch.tensor({IDS.tolist()})).logits for rev in revisions], out)
"""


def _load_in_fresh_process(tmp_path: Path, repo_id: str, revisions: list[str], **env: str) -> tuple[list[torch.Tensor], str]:
    """Logits of load_patched(repo_id, revision=...) for each revision, computed by a new Python process; and its output."""
    out = tmp_path / "fresh-logits.pt"
    run = subprocess.run(
        [sys.executable, "-c", _FRESH_LOAD, str(out), repo_id, *revisions],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return torch.load(out), run.stdout + run.stderr


def test_a_pushed_patched_model_loads_by_id_in_a_fresh_process_pinned_and_offline(hub, tmp_path):
    model, tokenizer, base = _push_base(tmp_path, "ns/base")
    old, new = sparse_module(model), sparse_module(model)
    with torch.no_grad():
        new.W_O.mul_(2)  # the second version differs in its module weights
    with splice(model, {LAYER: old}) as handle:
        expected_old = _logits(model)
        save_patched(handle, tmp_path / "v1", base=base, repo_id="ns/patched")
    first = push_folder(tmp_path / "v1", "ns/patched")
    assert {"README.md", "lorsa_surgery.json", f"layer_{LAYER}/lorsa.safetensors"} <= set(HfApi().list_repo_files("ns/patched"))
    assert ModelCard.load("ns/patched").data.base_model == "ns/base"

    (got,), output = _load_in_fresh_process(tmp_path, "ns/patched", ["main"])
    _assert_same(got, expected_old)
    # The base is fetched by its recorded id and commit; a local base folder overrides it.
    assert read_root(pull("ns/patched"))["base_model"] == base
    _assert_same(_logits(load_patched(tmp_path / "v1", base=str(tmp_path / "base"))[0]), expected_old)

    with splice(model, {LAYER: new}) as handle:
        expected_new = _logits(model)
        generated = PROMPT + generate_text(model, tokenizer, PROMPT, max_new_tokens=6)
        save_patched(handle, tmp_path / "v2", base=base, repo_id="ns/patched")
    push_folder(tmp_path / "v2", "ns/patched")
    assert (expected_new - expected_old).abs().max().item() > 1e-3
    _assert_same(_logits(load_patched("ns/patched", revision=first.oid)[0]), expected_old)
    _assert_same(_logits(load_patched("ns/patched")[0]), expected_new)

    hub.reset()
    (latest, pinned), offline_output = _load_in_fresh_process(tmp_path, "ns/patched", ["main", first.oid], HF_HUB_OFFLINE="1")
    _assert_same(latest, expected_new)
    _assert_same(pinned, expected_old)
    cli = subprocess.run(
        [Path(sys.executable).with_name("lorsa-surgery"), "generate", "ns/patched", "--prompt", PROMPT, "--max-new-tokens", "6"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == generated.strip()
    assert hub.requests == []

    token = os.environ["HF_TOKEN"]
    assert token not in output + offline_output + cli.stdout + cli.stderr
    for root in (tmp_path, Path(os.environ["HF_HOME"])):
        assert [p for p in root.rglob("*") if p.is_file() and token.encode() in p.read_bytes()] == []


def test_cli_pushes_pulls_and_generates_from_a_patched_repo(hub, tmp_path):
    model, tokenizer, base = _push_base(tmp_path, "ns/cli-base")
    with splice(model, {LAYER: sparse_module(model)}) as handle:
        save_patched(handle, tmp_path / "patched", base=base)
        expected = PROMPT + generate_text(model, tokenizer, PROMPT, max_new_tokens=6)
    runner = CliRunner()
    pushed = runner.invoke(main, ["push", str(tmp_path / "patched"), "--repo-id", "ns/cli-patched", "--commit-message", "v1"])
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout.strip() == f"{hub.url}/ns/cli-patched/commit/{hub.refs('ns/cli-patched')['main']}"

    pulled = runner.invoke(main, ["pull", "ns/cli-patched", "--out", str(tmp_path / "out")])
    assert pulled.exit_code == 0, pulled.output
    assert _files(tmp_path / "out") == _files(tmp_path / "patched")

    hub.reset()
    generated = runner.invoke(main, ["generate", "ns/cli-patched", "--prompt", PROMPT, "--max-new-tokens", "6"])
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.strip() == expected.strip()
    fetched = {r.path.split("/", 5)[-1] for r in hub.requests if r.path.startswith("/ns/cli-patched/resolve/")}
    assert {"lorsa_surgery.json", f"layer_{LAYER}/lorsa.safetensors"} <= fetched  # it ran the patched model


def test_a_failed_patched_model_push_leaves_the_remote_as_it_was_and_a_retry_succeeds(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the client's back-off between upload retries
    model = tiny("llama")
    base = {"id": "ns/fault-base", "revision": None}
    versions = {}
    for version, scale in (("v1", 1.0), ("v2", 3.0)):
        lorsa = sparse_module(model)
        with torch.no_grad():
            lorsa.W_O.mul_(scale)  # new weights, so the second push has an upload to cut
        with splice(model, {LAYER: lorsa}) as handle:
            versions[version] = save_patched(handle, tmp_path / version, base=base)
    push_folder(versions["v1"], "ns/fault")
    refs_before = hub.refs("ns/fault")
    # Cut uploads first: after a refused commit the new weights are stored already, leaving nothing to cut.
    for fault, symptom in [
        (hub.die_mid_upload, f"Error while uploading 'layer_{LAYER}/lorsa.safetensors' to the Hub"),
        (lambda: hub.refuse_next_commit(500), "the Hub answered HTTP 500"),
    ]:
        fault()
        with pytest.raises(LorsaSurgeryError, match=rf"^Could not push .* to Hub repo 'ns/fault': .*{symptom}"):
            push_folder(versions["v2"], "ns/fault")
        assert hub.refs("ns/fault") == refs_before
        assert _files(pull("ns/fault", out_dir=tmp_path / "remote", overwrite=True)) == _files(versions["v1"])
        hub.reset()
    info = push_folder(versions["v2"], "ns/fault")
    assert hub.refs("ns/fault")["main"] == info.oid
    assert _files(pull("ns/fault")) == _files(versions["v2"])


def test_a_full_export_is_self_contained(hub, tmp_path):
    model, tokenizer = tiny("llama"), _tokenizer()
    plain = _logits(model)
    with splice(model, {LAYER: sparse_module(model)}) as handle:
        expected = _logits(model)
        export_full(handle, tokenizer, tmp_path / "full", base={"id": "ns/never-pushed", "revision": None})
        _assert_same(_logits(model), expected)  # exporting leaves the splice in place
    # base/ holds the host's own weights, loadable by plain transformers.
    _assert_same(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "base")), plain)
    _assert_same(_logits(load_patched(tmp_path / "full")[0]), expected)

    push_folder(tmp_path / "full", "ns/full")
    hub.reset()
    _assert_same(_logits(load_patched("ns/full")[0]), expected)
    assert hub.requests and not any("never-pushed" in r.path for r in hub.requests)


# ---- model cards -----------------------------------------------------------------------------------------------


def _card(tmp_path: Path, *, extras: bool, base: dict | None = None) -> str:
    """The README.md that save_patched writes for a deterministic splice of tiny("llama"); with extras, the module
    has a catalog and training info, an ablation is attached, and metrics are recorded."""
    model = tiny("llama")
    lorsa = sparse_module(model)
    metrics = None
    if extras:
        lorsa.catalog = {5: {"label": "previous-token", "note": "attends to the token before"}, 17: {"label": "induction"}}
        lorsa.training_info = {"tokens": 2_000_000, "top_k": lorsa.cfg.top_k, "explained_variance": 0.9312}
        metrics = {
            "layers": {str(LAYER): {"explained_variance": 0.9312}},
            "lm_loss": {"original": 4.5751, "spliced": 4.6012, "delta": 0.0261},
            "tokens": 4096,
            "text_source": "the built-in sample text",
            "datasets": ["ns/corpus"],
        }
    with splice(model, {LAYER: lorsa}) as handle:
        if extras:
            InterventionSet([Ablate(f"L{LAYER}.H5")]).attach(handle)
        base = base or {"id": "ns/base", "revision": "0" * 40, "license": "apache-2.0"}
        folder = save_patched(handle, tmp_path / f"card-{extras}", base=base, metrics=metrics, repo_id="ns/patched")
    return (folder / "README.md").read_text(encoding="utf-8")


def test_card_metadata_parses_with_and_without_training_info(tmp_path):
    full, bare = ModelCard(_card(tmp_path, extras=True)), ModelCard(_card(tmp_path, extras=False))
    for card in (full, bare):
        assert card.data.library_name == "lorsa-surgery" and card.data.base_model == "ns/base"
        assert card.data.base_model_relation == "adapter" and card.data.license == "apache-2.0"
        assert {"lorsa", "interpretability"} <= set(card.data.tags)
        assert 'load_patched("ns/patched")' in card.text and "lorsa-surgery generate ns/patched" in card.text
    assert full.data.datasets == ["ns/corpus"] and bare.data.datasets is None
    for section in ("## Training", "## Notable heads", "## Interventions", "| 4.6012 |", "`L1.H5` | previous-token"):
        assert section in full.text and section not in bare.text
    assert "No evaluation was recorded" in bare.text


def test_card_of_a_local_base_file_has_no_hub_base_model(tmp_path):
    local = {"id": "model.gguf", "file": "model.gguf", "sha256": "ab" * 32}
    card = ModelCard(_card(tmp_path, extras=False, base=local))
    assert card.data.library_name == "lorsa-surgery" and card.data.base_model is None
    assert "# model.gguf with Lorsa at layer 1" in card.text


def test_card_snapshot(tmp_path):
    text = _card(tmp_path, extras=True)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(text, encoding="utf-8")
    assert text == SNAPSHOT.read_text(encoding="utf-8")


# ---- local bases, true bases, one-line failures ----------------------------------------------------------------


def test_a_local_base_is_recorded_by_name_and_found_again_only_here(hub, tmp_path):
    from lorsa_surgery import load_model

    tiny("llama").save_pretrained(tmp_path / "my-base")
    _tokenizer().save_pretrained(tmp_path / "my-base")
    model, _ = load_model(str(tmp_path / "my-base"))
    with splice(model, {LAYER: sparse_module(model)}) as handle:
        expected = _logits(model)
        save_patched(handle, tmp_path / "patched")  # the base the splice knows, from load_model
    root = read_root(tmp_path / "patched")
    assert root["base_model"]["id"] == "my-base" and set(root["base_model"]) == {"id", "fingerprint"}
    published = [p for p in (tmp_path / "patched").rglob("*") if p.is_file() and p.name != LOCAL_HINT]
    assert published and not [p for p in published if str(tmp_path).encode() in p.read_bytes()]
    assert Lorsa.from_pretrained(tmp_path / "patched" / f"layer_{LAYER}").cfg.host_model == "my-base"
    _assert_same(_logits(load_patched(tmp_path / "patched")[0]), expected)  # no base=: the local hint finds it

    push_folder(tmp_path / "patched", "ns/local-base")
    assert LOCAL_HINT not in HfApi().list_repo_files("ns/local-base")
    with pytest.raises(LorsaSurgeryError, match="local folder my-base .* pass base=PATH"):
        load_patched("ns/local-base")  # elsewhere (no hint), the base must be named
    (tmp_path / "my-base" / "extra.txt").write_text("another model now")
    with pytest.raises(LorsaSurgeryError, match="pass base=PATH"):
        load_patched(tmp_path / "patched")  # the hint's folder no longer holds the recorded base
    _assert_same(_logits(load_patched(tmp_path / "patched", base=str(tmp_path / "my-base"))[0]), expected)


def test_saving_an_intervention_on_a_patched_model_from_the_hub_keeps_its_true_base(hub, tmp_path):
    model, tokenizer, base = _push_base(tmp_path, "ns/ablate-base")
    with splice(model, {LAYER: sparse_module(model)}) as handle:
        save_patched(handle, tmp_path / "patched", base=base)
    push_folder(tmp_path / "patched", "ns/ablate-patched")
    result = CliRunner().invoke(main, ["ablate", "ns/ablate-patched", "--heads", "L1.H3-40", "--prompt", PROMPT,
                                       "--save", str(tmp_path / "ablated")])
    assert result.exit_code == 0, result.output
    assert read_root(tmp_path / "ablated")["base_model"] == base
    again, _, handle = load_patched(tmp_path / "ablated")
    assert [r.heads for r in handle.interventions] == [["L1.H3-40"]]


def test_cli_failures_at_the_hub_and_with_patched_models_are_one_line(hub, tmp_path):
    model, tokenizer, base = _push_base(tmp_path, "ns/line-base")
    with splice(model, {LAYER: sparse_module(model)}) as handle:
        save_patched(handle, tmp_path / "patched", base=base)
    runner = CliRunner()
    both = runner.invoke(main, ["generate", str(tmp_path / "patched"), "--lorsa", "2=from-attention", "--prompt", PROMPT])
    assert both.exit_code == 1 and "is a patched model that brings its own Lorsa modules" in both.output
    missing = runner.invoke(main, ["generate", "ns/no-such-repo", "--prompt", PROMPT])
    assert missing.exit_code == 1 and "Could not read Hub repo 'ns/no-such-repo'" in missing.output
    hub.refuse_tokens()
    refused = runner.invoke(main, ["generate", "ns/line-base", "--prompt", PROMPT])
    assert refused.exit_code == 1 and "Could not read Hub repo 'ns/line-base'" in refused.output
    assert "the Hub answered HTTP 401 (Invalid credentials" in refused.output
    for result in (both, missing, refused):
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
