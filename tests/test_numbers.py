"""Numbers read from files and flags are finite and in range, or refused in one sentence naming the file and the field;
a run whose loss or outputs turn non-finite stops instead of saving (issue 29)."""

import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorsa_surgery import Lorsa, LorsaSurgeryError

from lorsa_surgery.host import models
from lorsa_surgery.training.healing import HealConfig
from lorsa_surgery.interventions.edits import InterventionSet, Steer, parse_positions, parse_steer
from lorsa_surgery.multihop import train as multihop
from lorsa_surgery.training.trainer import TrainConfig
from test_interventions import cli, spliced, tiny_folders
from test_lorsa import random_reference_weights, reference_config, write_reference

INF = "__INF__"
"""Written into a JSON file as 1e999, which JSON parsers read as infinity."""


def write_json(path, value) -> None:
    path.write_text(json.dumps(value).replace(f'"{INF}"', "1e999"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the numbers were checked")

    monkeypatch.setattr(models, "load_model", refuse)


def refused_in_one_line(result, *needles) -> str:
    """The CLI's error, after checking it refused with one `Error:` line (no traceback) holding every needle. The line
    may follow a progress bar's carriage return: the runner mixes stderr into the output."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert "Error: " in last, result.output
    error = last[last.index("Error: "):]
    assert "unexpected" not in error and all(n in error for n in needles), error
    return error


def module_copy(lorsa_dir, tmp_path, file, edit):
    """A copy of the Lorsa folder in which `edit(raw)` changed the JSON of `file`."""
    folder = tmp_path / "module"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(lorsa_dir, folder)
    raw = json.loads((folder / file).read_text())
    edit(raw)
    write_json(folder / file, raw)
    return folder


# ---- lorsa_config.json and the reference config.json ----------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("rotary_base", -1.0), ("rotary_base", 0), ("rotary_base", INF), ("rotary_base", "10000"),
    ("attn_scale", 0), ("attn_scale", -2.0), ("attn_logit_softcap", INF), ("NTK_by_parts_factor", 0),
    ("qk_ln_eps", -1e-6), ("d_model", "64"), ("d_model", None), ("d_model", 64.5), ("n_ov_heads", [128]),
    ("n_qk_heads", {"n": 4}), ("top_k", True), ("top_k", 0), ("top_k", 129), ("use_decoder_bias", 1),
    ("act_fn", ["topk"]), ("rotary_dim", 3), ("rotary_dim", 64), ("n_ctx", 10**400), ("host_layer", -1),
    ("hook_point_in", 5),
])
def test_every_lorsa_config_field_is_checked_on_load(folders, tmp_path, field, value):
    folder = module_copy(folders[1], tmp_path, "lorsa_config.json", lambda raw: raw["config"].update({field: value}))
    with pytest.raises(LorsaSurgeryError) as e:
        Lorsa.from_pretrained(folder)
    assert str(e.value).startswith(f"{folder / 'lorsa_config.json'}: {field} "), e.value


def test_a_lorsa_config_of_the_wrong_shape_or_size_is_one_sentence(folders, tmp_path):
    folder = module_copy(folders[1], tmp_path, "lorsa_config.json", lambda raw: raw.update(config=[]))
    with pytest.raises(LorsaSurgeryError, match="lorsa_config.json: The Lorsa config must be a JSON object, not list"):
        Lorsa.from_pretrained(folder)
    folder = module_copy(folders[1], tmp_path, "lorsa_config.json", lambda raw: raw.update(format_version="2"))
    with pytest.raises(LorsaSurgeryError, match="lorsa_config.json: format_version must"):
        Lorsa.from_pretrained(folder)
    # Refused from the config alone: nothing the size of 2**40 elements is allocated.
    folder = module_copy(folders[1], tmp_path, "lorsa_config.json",
                         lambda raw: raw["config"].update(d_model=2**20, n_ov_heads=2**20))
    with pytest.raises(LorsaSurgeryError, match="lorsa_config.json: .* more than the 1.72e\\+10 a Lorsa module may hold"):
        Lorsa.from_pretrained(folder)


def test_inspect_refuses_a_bad_config_in_one_line(folders, tmp_path):
    folder = module_copy(folders[1], tmp_path, "lorsa_config.json", lambda raw: raw["config"].update(rotary_base=-1.0))
    refused_in_one_line(cli("inspect", folder, "--json"), str(folder / "lorsa_config.json"), "rotary_base must be positive")


@pytest.mark.parametrize("field, value", [
    ("d_model", "32"), ("expansion_factor", INF), ("d_sae", -5), ("hook_point_in", 5), ("eps", -1), ("rotary_base", 0),
    ("attn_scale", -2.0), ("top_k", 99), ("model_name", ["x"]), ("n_ctx", None), ("norm_activation", 1),
])
def test_every_reference_config_field_is_checked_on_load(tmp_path, field, value):
    c = reference_config()
    folder = write_reference(tmp_path / "ref", c, random_reference_weights(c))
    write_json(folder / "config.json", dict(c, **{field: value}))
    with pytest.raises(LorsaSurgeryError) as e:
        Lorsa.from_pretrained(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}: {field} "), e.value


@pytest.mark.parametrize("norm", [math.nan, math.inf, -2.5, 0.0, (2.5, 2.5)])
def test_dataset_norms_are_finite_and_positive(tmp_path, norm):
    c = reference_config()
    w = random_reference_weights(c)
    w["dataset_average_activation_norm.blocks.2.ln1.hook_normalized"] = torch.tensor(norm)
    folder = write_reference(tmp_path / "ref", c, w)
    with pytest.raises(LorsaSurgeryError, match="sae_weights.safetensors: dataset_average_activation_norm.blocks.2.ln1.hook_normalized must"):
        Lorsa.from_pretrained(folder)


# ---- checkpoint tensors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_file_and_tensor(folders, tmp_path, bad):
    folder = module_copy(folders[1], tmp_path, "lorsa_config.json", lambda raw: None)
    weights = load_file(str(folder / "lorsa.safetensors"))
    weights["W_O"][3, 5] = bad
    save_file(weights, str(folder / "lorsa.safetensors"))
    with pytest.raises(LorsaSurgeryError, match=f"Weights in {folder / 'lorsa.safetensors'}: W_O holds NaN or infinite values"):
        Lorsa.from_pretrained(folder)

    c = reference_config()
    w = random_reference_weights(c)
    w["W_Q"][0, 0, 0] = bad
    with pytest.raises(LorsaSurgeryError, match="sae_weights.safetensors: W_Q holds NaN or infinite values"):
        Lorsa.from_pretrained(write_reference(tmp_path / "ref", c, w))


def test_tensors_that_contradict_the_config_are_one_sentence(tmp_path):
    c = reference_config()
    w = dict(random_reference_weights(c), W_Q=torch.tensor(1.0))  # no head dimension at all
    with pytest.raises(LorsaSurgeryError, match="W_Q has shape \\(\\), the config implies \\(4, 32, 8\\)"):
        Lorsa.from_pretrained(write_reference(tmp_path / "ref", c, w))

    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "config.json").write_text(json.dumps({
        "d_qk_head": 4, "n_qk_heads": 2, "n_ov_heads": 8, "mode": "top_k", "top_k": 3, "avg_norm": {"in": 2.0, "out": 5.0},
        "d_model": 16, "positional_embedding_type": "rotary", "rotary_dim": 4}))
    tensors = {"W_Q": torch.zeros(2, 16, 4), "W_K": torch.zeros(2, 16, 4), "b_Q": torch.zeros(2, 4), "b_K": torch.zeros(2, 4),
               "W_V": 5, "b_V": torch.zeros(8), "W_O": torch.zeros(8, 16), "b_O": torch.zeros(16)}
    torch.save(tensors, paper / "final.pth")
    with pytest.raises(LorsaSurgeryError, match="final.pth: W_V is a int, not a tensor"):
        Lorsa.from_pretrained(paper, allow_pickle=True)
    (paper / "config.json").write_text(json.dumps({
        "d_qk_head": 4, "n_qk_heads": 2, "n_ov_heads": 8, "mode": "top_k", "top_k": 3, "avg_norm": {"in": -2.0, "out": 5.0},
        "d_model": 16}))
    with pytest.raises(LorsaSurgeryError, match="paper/config.json: avg_norm.in must be positive"):
        Lorsa.from_pretrained(paper, allow_pickle=True)


# ---- head_catalog.json ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads, message", [
    ({"-1": {"label": "last"}}, "'-1' is not a head index of this module \\(0 to 127"),
    ({"999": {"label": "far"}}, "'999' is not a head index"),
    ({"1": {"label": "a"}, "01": {"label": "b"}}, "'01' is not a head index"),
    ({"1.0": {"label": "a"}}, "'1.0' is not a head index"),
    ({"\u0663": {"label": "a"}}, "'\u0663' is not a head index"),  # an Arabic-Indic 3: str.isdigit and int() accept it
    ({" 1": {"label": "a"}}, "' 1' is not a head index"),
    ({"1": ["a"]}, "the entry of head 1 must be an object with a string label and note"),
    ({"1": {"label": 5}}, "the entry of head 1 must be"),
    ({"1": {"label": "a", "colour": "red"}}, "the entry of head 1 must be"),
    ([], "heads must be an object"),
])
def test_catalog_keys_are_plain_head_indices_in_range(folders, tmp_path, heads, message):
    folder = module_copy(folders[1], tmp_path, "head_catalog.json", lambda raw: raw.update(heads=heads))
    with pytest.raises(LorsaSurgeryError, match=f"{folder / 'head_catalog.json'}: {message}"):
        Lorsa.from_pretrained(folder)


def test_a_sound_catalog_still_loads(folders):
    assert Lorsa.from_pretrained(folders[1]).catalog == {5: {"label": "five", "note": "a test head"}, 17: {"label": "tee"}}


# ---- interventions ---------------------------------------------------------------------------------------------------


def test_positions_are_bounded_and_deduplicated():
    for bad in (10**21, [10**21], "0:" + "1" * 22, "-" + "9" * 21):
        with pytest.raises(LorsaSurgeryError, match="A position must be between -2147483647 and 2147483647"):
            parse_positions(bad)
    assert parse_positions([3, 3, -1, 3]) == [3, -1] and parse_positions("2,5,2") == [2, 5]
    start = time.perf_counter()
    for many in (list(range(3_000_000)), ",".join(["7"] * 3_000_000)):
        with pytest.raises(LorsaSurgeryError, match="3000000 positions are more than the 100000 one selector may list"):
            parse_positions(many)
    assert time.perf_counter() - start < 5  # it took 53 s and 2.3 GB to run three tokens with such a list


def test_steering_values_are_finite_and_bounded():
    for value in (math.nan, math.inf, 1e38, -2e6):
        with pytest.raises(LorsaSurgeryError, match="clamp must be between -1e\\+06 and 1e\\+06 \\(a finite number\\)"):
            Steer("L1.H5", clamp=value)
    with pytest.raises(LorsaSurgeryError, match="In 'L1.H5=1e38': clamp must be between"):
        parse_steer("L1.H5=1e38")
    with pytest.raises(LorsaSurgeryError, match="scale must be"):
        parse_steer("L1.H5*=inf")
    assert Steer("L1.H5", add=1e6).add == 1e6


def test_steer_1e38_on_the_command_line_is_one_line(folders):
    model_dir, lorsa_dir = folders
    result = cli("generate", model_dir, "--lorsa", f"1={lorsa_dir}", "--prompt", "abc", "--steer", "L1.H5=1e38")
    refused_in_one_line(result, "L1.H5=1e38", "clamp must be between -1e+06 and 1e+06")


SPEC = {"format": "lorsa-surgery.interventions", "format_version": 1}


@pytest.mark.parametrize("spec, message", [
    (dict(SPEC, format_version="2", interventions=[]), "format_version must"),
    (dict(SPEC, interventions=[{"type": "ablate", "heads": "L1.H1", "positions": [10**21]}]), "A position must be between"),
    (dict(SPEC, interventions=[{"type": "ablate", "heads": 5}]), "The heads of a ablate intervention must be a string"),
    (dict(SPEC, interventions=[{"type": "steer", "heads": "L1.H1", "add": INF}]), "add must be between"),
    (dict(SPEC, interventions=[{"type": "ablate", "heads": "L1.H1", "how": "mean", "means": {"L1.H1": INF}}]),
     "The mean of L1.H1 must be between"),
    (dict(SPEC, interventions=[{"type": "ablate", "heads": "L1.H1", "how": "mean", "means": [1.0]}]),
     "Mean ablation needs means as head ref -> number"),
    (dict(SPEC, interventions=[{"type": "patch", "heads": "L1.H1", "source": {
        "heads": ["L1.H1"], "lengths": [3], "indices": [[0, 7, 0]], "values": [1.0]}}]), "Cached activations have an index \\[row, position, column\\] outside"),
    (dict(SPEC, interventions=[{"type": "patch", "heads": "L1.H1", "source": {
        "heads": ["L1.H1"], "lengths": [10**12], "indices": [], "values": []}}]), "Each cached length must be between"),
    (dict(SPEC, interventions=[{"type": "patch", "heads": "L1.H1", "source": {
        "heads": ["L1.H1"], "lengths": [2**20] * 200, "indices": [], "values": []}}]), "Cached activations covering 200 rows .* more than the 134217728 entries"),
    (dict(SPEC, interventions=[{"type": "patch", "heads": "L1.H1", "source": {
        "heads": ["L1.H1"], "lengths": [3], "indices": [[0, 1, 0]], "values": [INF]}}]), "Cached activation values must be finite numbers of magnitude"),
    (dict(SPEC, interventions=[{"type": "ablate", "heads": "L1.H1"}] * 10_001), "10001 interventions are more than the 10000"),
])
def test_intervention_files_are_checked(tmp_path, spec, message):
    path = tmp_path / "interventions.json"
    write_json(path, spec)
    with pytest.raises(LorsaSurgeryError, match=f"{path}: {message}"):
        InterventionSet.load(path)


def test_a_position_of_1e21_in_an_intervention_file_is_one_line(folders, tmp_path, no_model_load):
    model_dir, lorsa_dir = folders
    path = tmp_path / "interventions.json"
    write_json(path, dict(SPEC, interventions=[{"type": "ablate", "heads": "L1.H1", "positions": [10**21]}]))
    result = cli("generate", model_dir, "--lorsa", f"1={lorsa_dir}", "--prompt", "abc", "--interventions", path)
    refused_in_one_line(result, str(path), "A position must be between")


@torch.no_grad()
def test_generation_stops_when_interventions_make_the_logits_non_finite():
    model, handle = spliced()
    ids = torch.randint(3, 97, (1, 6))
    # Each record is within bounds; seven of them multiply activations by 1e42, past float32's 3e38.
    with pytest.raises(LorsaSurgeryError, match="logits became NaN or infinite"):
        with InterventionSet([Steer("L1.H0-127", scale=1e6)] * 7).applied(model):
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with InterventionSet([Steer("L1.H0-127", scale=2.0)]).applied(model):  # a sound one still generates
        assert model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 8)
    model.half()  # a clamp float16 cannot hold raised inside torch before
    with pytest.raises(LorsaSurgeryError, match="Steering value 100000 does not fit the model's torch.float16 activations"):
        with InterventionSet([Steer("L1.H3", clamp=1e5)]).applied(model):
            model(ids)


# ---- training configs and runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("lr", math.inf), ("lr", math.nan), ("lr", 0.0), ("lr", -1e-3), ("grad_clip", math.nan), ("grad_clip", -1.0),
    ("expansion", 1e9), ("expansion", math.inf), ("expansion", math.nan), ("expansion", 0.0), ("warmup", -0.1),
    ("warmup", math.nan), ("cooldown", math.inf), ("k_anneal", 2.0), ("k", True), ("context", 10**9), ("seed", -1),
    ("tokens", 0), ("batch_size", 2.5), ("n_heads", 10**12), ("pack", "yes"), ("sample_tokens", -1),
])
def test_train_config_refuses_bad_numbers(field, value):
    with pytest.raises(LorsaSurgeryError, match=f"^{field}"):
        TrainConfig(model="m", layers=(1,), out="o", **{field: value})


@pytest.mark.parametrize("field, value", [
    ("lr", math.inf), ("lorsa_lr", math.nan), ("warmup", math.nan), ("warmup", 1.0), ("lora_rank", True),
    ("context", "128"), ("tokens", 10**30), ("train_lorsa", 1),
])
def test_heal_config_refuses_bad_numbers(field, value):
    with pytest.raises(LorsaSurgeryError, match=f"^{field}"):
        HealConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("lr", math.nan, "lr must"), ("betas", (math.nan, 0.9), "Each of betas"), ("betas", (0.9,), "betas must be two"),
    ("betas", (1.0, 0.9), "Each of betas"), ("grad_clip", -1.0, "grad_clip"), ("dropout", math.nan, "dropout"),
    ("rotary_base", math.inf, "rotary_base must be above 1"), ("n_embd", 10**6, "n_embd"), ("hops", (1.5,), "Each hop"),
    ("checkpoint_steps", (-1,), "Each checkpoint step"), ("weight_decay", math.inf, "weight_decay"),
    ("n_layer", 0, "n_layer"), ("hops", 3, "hops must be a list"),
])
def test_multihop_config_refuses_bad_numbers(field, value, message):
    with pytest.raises(LorsaSurgeryError, match=f"^{message}"):
        multihop.TaskTrainConfig(**{field: value})


@pytest.mark.parametrize("flags, message", [
    (("--expansion", "1e9"), "expansion must be positive (a finite number of at most 1024), got 1000000000.0."),
    (("--expansion", "inf"), "expansion must be positive (a finite number of at most 1024), got inf."),
    (("--lr", "nan"), "lr must be positive (a finite number), got nan."),
    (("--lr", "-inf"), "lr must be positive"),
    (("--grad-clip", "nan"), "grad_clip must not be negative"),
    (("--warmup", "nan"), "warmup must be between 0 and 1"),
    (("--heads", str(2**30)), "more than the 1.72e+10 a Lorsa module may hold"),  # read from the host config alone
    (("--context", str(10**9)), "context (BOS plus at least one token) must be between 2 and 1048576"),
    (("--threads", "0"), "--threads must be between 1 and 4096"),
])
def test_numeric_train_flags_fail_in_one_line_before_anything_runs(folders, tmp_path, no_model_load, flags, message):
    result = cli("train", folders[0], "--layer", "1", "--tokens", "1024", "--out", tmp_path / "run", *flags)
    refused_in_one_line(result, message)
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_and_writes_no_module(folders, tmp_path):
    out = tmp_path / "run"
    result = cli("train", folders[0], "--layer", "1", "--tokens", "2048", "--batch-size", "2", "--context", "32",
                 "--eval-tokens", "64", "--lm-loss-tokens", "0", "--heads", "64", "--k", "8", "--lr", "1e30", "--out", out)
    refused_in_one_line(result, "Training layer 1 diverged at step", "so its module was not saved")
    assert not list(out.rglob("lorsa.safetensors")) and not list(out.rglob("lorsa_config.json"))


def test_a_diverging_multihop_run_stops_before_its_checkpoint(tmp_path):
    config = multihop.TaskTrainConfig(n_layer=1, n_embd=16, steps=6, batch_size=4, eval_examples=8, eval_every=3,
                                  checkpoint_steps=(), lr=1e30, warmup_steps=0)
    with pytest.raises(LorsaSurgeryError, match="Training diverged at step \\d"):
        multihop.train(config, tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").glob("step_*"))


# ---- inspect --json ---------------------------------------------------------------------------------------------


def test_inspect_json_never_prints_nan_or_infinity(folders, monkeypatch):
    from lorsa_surgery.cli import checkpoint

    real = checkpoint.describe
    monkeypatch.setattr(checkpoint, "describe", lambda lorsa: dict(real(lorsa), attn_scale=math.nan,
                                                                   folded_norms={"in": math.inf, "out": 2.0}))
    result = cli("inspect", folders[1], "--json")
    assert result.exit_code == 0, result.output

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    info = json.loads(result.stdout, parse_constant=refuse)
    assert info["attn_scale"] is None and info["folded_norms"] == {"in": None, "out": 2.0}
