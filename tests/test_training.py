"""Training: activation capture, text sources, exact resume, the activation cache, the CLI, two processes
against one, and a short real run on SmolLM2 layer 3 that must beat the best linear map."""

import json
import shutil
import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import pydoc_data.topics
import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from lorsa_surgery import Lorsa, LorsaConfig, LorsaSurgeryError
from lorsa_surgery.training import trainer as training
from lorsa_surgery.cli import main
from lorsa_surgery.host.corpus import BUILTIN_TEXT, load_dataset_texts, sample_from_model
from lorsa_surgery.training.trainer import LinearBaseline, TrainConfig, capture, linear_baseline_ev, lm_loss_change, token_sequences, train
from lorsa_surgery.host.arch import exact_copy


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, especially on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """A tiny random Llama and a small byte-level BPE tokenizer, saved as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("host")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([BUILTIN_TEXT], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<pad>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": BUILTIN_TEXT[i:] + BUILTIN_TEXT[:i]}) + "\n" for i in range(0, 1200, 60)))
    return path


def tiny_config(host: Path, text: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(model=str(host), layers=(1,), out=str(out), n_heads=32, k=4, tokens=4 * 32 * 12, batch_size=4, context=32,
                    texts=(str(text),), eval_tokens=128, lm_loss_tokens=64, lr=3e-3, log_every=2, checkpoint_every=4)
    return TrainConfig(**{**settings, **changes})


def state(lorsa: Lorsa) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lorsa.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), (name, (a[name] - b[name]).abs().max().item())


# ---- pieces --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_capture_gives_what_attention_sees_and_stops_there(host):
    model = tf.AutoModelForCausalLM.from_pretrained(host).eval()
    later = []
    model.model.layers[2].register_forward_hook(lambda *args: later.append(True))
    ids = torch.randint(4, 300, (2, 12))
    x, y = capture(model, 1, ids)
    assert x.shape == y.shape == (2, 12, 64) and not later
    # The exact copy of the host layer maps the captured input to the captured output: HF coordinates.
    assert torch.allclose(exact_copy(model, 1)(x), y, atol=1e-5)
    with pytest.raises(LorsaSurgeryError, match="out of range"):
        capture(model, 3, ids)


def test_token_sequences_pack_and_pad(host):
    tokenizer = tf.AutoTokenizer.from_pretrained(host)
    docs = ["the lighthouse keeper", "a list of prime numbers begins 2, 3, 5"]
    ids, mask = token_sequences(docs, tokenizer, context=8)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (ids[:, 0] == bos).all()
    stream = ids[:, 1:][mask[:, 1:].bool()].tolist()
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert stream == encoded[0] + [eos] + encoded[1] + [eos]
    assert mask[:-1].all() and not mask[-1].all() and (ids[-1][~mask[-1].bool()] == pad).all()
    unpacked, _ = token_sequences(docs, tokenizer, context=64, pack=False)
    assert len(unpacked) == 2 and unpacked[1, 1 : 1 + len(encoded[1])].tolist() == encoded[1]


def test_linear_baseline_is_exact_on_affine_targets_and_below_one_otherwise():
    torch.manual_seed(0)
    x = torch.randn(2000, 16)
    w, b = torch.randn(16, 8), torch.randn(8)
    fit = LinearBaseline(16, 8)
    for part in x.split(500):  # streamed fitting equals one fit
        fit.update(part, part @ w + b)
    assert torch.allclose(fit.predict(x[:5]).float(), x[:5] @ w + b, atol=1e-4)
    assert linear_baseline_ev(x[:1500], x[:1500] @ w + b, x[1500:], x[1500:] @ w + b) > 0.999999
    assert linear_baseline_ev(x[:1500], x[:1500].pow(2)[:, :8], x[1500:], x[1500:].pow(2)[:, :8]) < 0.05


def test_lm_loss_change_is_zero_for_the_exact_copy(host):
    model = tf.AutoModelForCausalLM.from_pretrained(host).eval()
    ids = torch.randint(4, 300, (2, 16))
    original, spliced = lm_loss_change(model, exact_copy(model, 1), 1, ids)
    assert original == pytest.approx(spliced, abs=1e-5) and original > 0


def test_sample_from_model_is_seeded_and_leaves_global_rng_alone(host, one_thread):
    model = tf.AutoModelForCausalLM.from_pretrained(host).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(host)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    docs = sample_from_model(model, tokenizer, 60, seed=5, length=16, batch_size=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert docs and docs == sample_from_model(model, tokenizer, 60, seed=5, length=16, batch_size=2)
    assert docs != sample_from_model(model, tokenizer, 60, seed=6, length=16, batch_size=2)


def test_dataset_source(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    try:
        import datasets  # noqa: F401  (the optional extra)
    except ImportError:
        with pytest.raises(LorsaSurgeryError, match="datasets package"):
            load_dataset_texts(str(folder), 100)
        return
    assert load_dataset_texts(str(folder), 100) == [f"document {i}" for i in range(5)]
    assert load_dataset_texts(str(folder), 15) == ["document 0", "document 1"]


def test_config_errors(host, text, tmp_path):
    with pytest.raises(LorsaSurgeryError, match="either n_heads or expansion"):
        tiny_config(host, text, tmp_path, expansion=2.0)
    with pytest.raises(LorsaSurgeryError, match="warmup and cooldown"):
        tiny_config(host, text, tmp_path, warmup=0.6, cooldown=0.6)
    with pytest.raises(LorsaSurgeryError, match="multiple of the QK heads"):
        train(tiny_config(host, text, tmp_path / "a", n_heads=30))
    with pytest.raises(LorsaSurgeryError, match="init 'attention'"):
        train(tiny_config(host, text, tmp_path / "b", init="attention"))


def test_a_head_selected_with_activation_zero_has_not_fired():
    """With fewer than K heads positive at a token, top-K also selects heads whose activation is zero."""
    lorsa = Lorsa(LorsaConfig(d_model=8, n_qk_heads=1, d_qk_head=4, n_ov_heads=6, top_k=4))
    with torch.no_grad():
        lorsa.W_V.zero_()  # every head's pre-activation is its value bias: two positive, four negative
        lorsa.b_V.copy_(torch.tensor([1.0, 2.0, -1.0, -1.5, -2.0, -3.0]))
    x = torch.randn(2, 5, 8)
    _, fired = training._Objective(lorsa)(x, torch.zeros_like(x), torch.arange(5).expand(2, 5), None,
                                          torch.ones(2, 5, dtype=torch.bool))
    assert sorted(fired.unique().tolist()) == [0, 1]


# ---- runs ----------------------------------------------------------------------------------------------


class Kill(Exception):
    pass


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(host, text, tmp_path, one_thread):
    whole = train(tiny_config(host, text, tmp_path / "whole", k_anneal=0.5, eval_every=6))[1]

    def die_at_6(step, record):
        if step == 6:  # the last checkpoint was at step 4: steps 5 and 6 are replayed
            raise Kill

    with pytest.raises(Kill):
        train(tiny_config(host, text, tmp_path / "cut", k_anneal=0.5, eval_every=6), on_step=die_at_6)
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text()) == {"step": 4}
    resumed = train(tiny_config(host, text, tmp_path / "cut", k_anneal=0.5, eval_every=6, resume=True))[1]
    assert_same_weights(state(whole), state(resumed))
    steps = [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / "cut" / "L1" / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps)) and ("eval", 12) in steps
    for key in ("explained_variance", "linear_baseline_ev", "lm_loss_spliced", "dead_heads_fraction"):
        assert whole.training_info[key] == resumed.training_info[key]
    with pytest.raises(LorsaSurgeryError, match="different settings: lr"):
        train(tiny_config(host, text, tmp_path / "cut", k_anneal=0.5, eval_every=6, resume=True, lr=1e-3))


@pytest.mark.slow
def test_activation_cache_is_reused(host, tmp_path, one_thread, monkeypatch):
    text = tmp_path / "short.jsonl"  # about 40 sequences, all of them seen by the first run
    text.write_text("".join(json.dumps({"text": BUILTIN_TEXT[i:i + 600]}) + "\n" for i in range(0, 2400, 600)))
    cache = tmp_path / "cache"
    first = train(tiny_config(host, text, tmp_path / "one", cache_dir=str(cache), tokens=4 * 32 * 16))[1]
    shards = sorted(cache.glob("*/shard-*.safetensors"))
    assert shards

    def no_host(*args, **kwargs):
        raise AssertionError("the host model ran although every activation was cached")

    monkeypatch.setattr(training, "capture_layers", no_host)
    again = train(tiny_config(host, text, tmp_path / "two", cache_dir=str(cache), tokens=4 * 32 * 16))[1]
    assert_same_weights(state(first), state(again))
    # Another seed and batch size read the same shards: new order, new held-out split, same cache.
    train(tiny_config(host, text, tmp_path / "three", cache_dir=str(cache), seed=1, batch_size=2))
    assert sorted(cache.glob("*/shard-*.safetensors")) == shards


@pytest.mark.slow
def test_cli_train(host, text, tmp_path, one_thread):
    out = tmp_path / "run"
    args = ["train", str(host), "--layer", "1", "--heads", "32", "--qk-heads", "2", "--k", "4", "--tokens", "1024",
            "--text", str(text), "--out", str(out), "--batch-size", "4", "--context", "32", "--eval-tokens", "128",
            "--lm-loss-tokens", "64", "--lr", "3e-3", "--checkpoint-every", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "EV held out" in result.output and "L1" in result.output
    lorsa = Lorsa.from_pretrained(out / "L1")
    assert (lorsa.cfg.n_ov_heads, lorsa.cfg.n_qk_heads, lorsa.cfg.top_k) == (32, 2, 4)
    assert (lorsa.cfg.host_layer, lorsa.cfg.input_space, lorsa.cfg.host_model) == (1, "hf", host.name)
    info = lorsa.training_info
    assert info["tokens"] == 1024 and info["steps"] == 8
    assert {"linear_baseline_ev", "lm_loss_original", "lm_loss_spliced", "dead_heads_fraction", "tokens_per_s"} <= info.keys()
    assert (out / "L1" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "L1" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 8), ("eval", 8)]
    final = records[-1]  # the module's record is the held-out evaluation, not the training batches
    assert (info["explained_variance"], info["linear_baseline_ev"], info["lm_loss_spliced"]) == (
        final["ev"], final["linear_ev"], final["lm_loss_spliced"]) and final["eval_tokens"] > 0

    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "already holds a training run" in again.output
    no_text = [a for a in args if a not in ("--text", str(text))]
    no_text[no_text.index(str(out))] = str(tmp_path / "builtin")
    builtin = CliRunner().invoke(main, no_text)
    assert builtin.exit_code == 0, builtin.output
    assert "No training text given: training on the built-in offline corpus, the Python documentation" in builtin.output
    both = CliRunner().invoke(main, args[:-2] + ["--expansion", "2"])
    assert both.exit_code != 0 and "either n_heads or expansion" in both.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_for_several_layers(host, text, tmp_path, one_thread):
    options = ["--layers", "0,1", "--heads", "32", "--k", "4", "--tokens", "1024", "--text", str(text), "--batch-size", "4",
               "--context", "32", "--eval-tokens", "128", "--lm-loss-tokens", "64", "--lr", "3e-3", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = tmp_path / "cli.py"  # the console script, wherever the package is installed
    cli.write_text("from lorsa_surgery.cli import main\nmain()\n")
    # --multi_gpu is accelerate's multi-process launcher (torchrun); without a GPU each process runs DDP over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
              str(cli), "train", str(host), "--out", str(tmp_path / "two"), *options]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ones = train(tiny_config(host, text, tmp_path / "one", layers=(0, 1), tokens=1024, checkpoint_every=100))
    for layer in (0, 1):  # several layers in one pass, under DDP
        two, one = Lorsa.from_pretrained(tmp_path / "two" / f"L{layer}"), ones[layer]
        assert two.training_info["processes"] == 2
        # Same global batch, split over two processes: equal up to float summation order.
        assert_same_weights(state(one), state(two), atol=1e-4)
        assert two.training_info["explained_variance"] == pytest.approx(one.training_info["explained_variance"], abs=1e-3)


# ---- the real model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_layer3_beats_the_best_linear_map(smollm2, tmp_path):
    """A CI-sized run on real SmolLM2-135M layer 3 with the default recipe: held-out explained variance well above
    the best linear map, in the training domain and on the built-in prose of other domains (docs/training.md)."""
    model, tokenizer = smollm2
    docs = tmp_path / "python-docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(pydoc_data.topics.topics.items())))
    config = TrainConfig(
        model="smollm2", layers=3, out=str(tmp_path / "run"), n_heads=1152, k=32, tokens=32 * 1024, batch_size=8,
        context=128, texts=(str(docs),), eval_tokens=2048, lm_loss_tokens=512, checkpoint_every=0,
    )
    info = train(config, model=model, tokenizer=tokenizer)[3].training_info
    print(f"\nSmolLM2 layer 3, {info['tokens']} tokens: held-out explained variance {info['explained_variance']:.4f}, "
          f"best linear map {info['linear_baseline_ev']:.4f}; other domain {info['ood_explained_variance']:.4f} "
          f"({info['ood_linear_baseline_ev']:.4f}); LM loss {info['lm_loss_original']:.4f} -> {info['lm_loss_spliced']:.4f}; "
          f"dead heads {info['dead_heads_fraction']:.1%}; {info['tokens_per_s']:.0f} tokens/s")
    assert (info["n_heads"], info["n_qk_heads"], info["init"]) == (1152, 9, "host")
    assert info["explained_variance"] > info["linear_baseline_ev"] + 0.1
    assert info["ood_explained_variance"] > max(info["ood_linear_baseline_ev"], 0.0) + 0.1
    assert abs(info["lm_loss_spliced"] - info["lm_loss_original"]) < 0.05


def test_a_run_too_short_for_warm_up_and_cool_down_has_a_flat_schedule(host, text, tmp_path):
    factor = training._schedule(tiny_config(host, text, tmp_path), steps=2)  # 5% and 20% of 2 steps round to none
    assert [factor(step) for step in range(3)] == [1.0, 1.0, 1.0]


# ---- the host initialisation, several layers at once, the generated CLI ----------------------------------


def _inputs(host: Path):
    model = tf.AutoModelForCausalLM.from_pretrained(host)
    torch.manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (3, 20))
    x, y = capture(model, 1, ids)
    return model, ids, x, y


def test_host_subspaces_at_the_exact_size_reproduce_the_layer(host):
    from lorsa_surgery.host.arch import from_host_subspaces

    model, ids, x, y = _inputs(host)
    H, hd = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    lorsa = from_host_subspaces(model, 1, H, 2 * H * hd, x)  # all heads fire (relu): the rotation loses nothing
    assert torch.allclose(lorsa(x), y, atol=1e-5), (lorsa(x) - y).abs().max()


def test_host_subspaces_order_heads_by_the_variance_they_carry(host):
    """Within each QK group, rank-1 parts come in signed pairs by falling output variance; a group bigger than its
    head's 2 x hd parts is filled with more directions in the same subspace."""
    from lorsa_surgery.host.arch import from_host_subspaces

    model, ids, x, y = _inputs(host)
    H, hd = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    lorsa = from_host_subspaces(model, 1, H, 4 * H * hd, x)
    group = 4 * hd
    z = lorsa.hidden_pre(x)
    for g in range(H):
        heads = torch.arange(g * group, (g + 1) * group)
        part = (z[..., heads[: 2 * hd : 2]].reshape(-1, hd) ** 2).mean(0)  # the positive copy of each part
        assert (part[:-1] >= part[1:] - 1e-6).all()  # principal axes: uncorrelated and by falling variance
        assert torch.allclose(lorsa.W_V[heads[1]], -lorsa.W_V[heads[0]]) and torch.allclose(lorsa.W_O[heads[1]], -lorsa.W_O[heads[0]])
        out = lorsa.W_O[heads[2 * hd :]]  # the extra directions lie in the head's own output subspace
        basis = torch.linalg.qr(lorsa.W_O[heads[: 2 * hd : 2]].T).Q
        assert torch.allclose(out @ basis @ basis.T, out, atol=1e-5)
    # Fewer heads than the copy: each group keeps its head's strongest parts, the same as the first of a bigger group.
    small = from_host_subspaces(model, 1, H, H * 8, x)
    for g in range(H):
        assert torch.allclose(small.W_O[g * 8 : (g + 1) * 8], lorsa.W_O[g * group : g * group + 8], atol=1e-6)
        assert torch.allclose(small.W_V[g * 8 : (g + 1) * 8], lorsa.W_V[g * group : g * group + 8], atol=1e-6)


@pytest.mark.slow
def test_layers_trained_in_one_pass_equal_layers_trained_alone(host, text, tmp_path, one_thread):
    together = train(tiny_config(host, text, tmp_path / "together", layers=(0, 2), checkpoint_every=0))
    assert sorted(together) == [0, 2]
    for layer in (0, 2):
        alone = train(tiny_config(host, text, tmp_path / f"alone{layer}", layers=(layer,), checkpoint_every=0))[layer]
        assert_same_weights(state(alone), state(together[layer]))  # the same arithmetic: bit-equal
        saved = Lorsa.from_pretrained(tmp_path / "together" / f"L{layer}")
        assert saved.cfg.host_layer == layer and saved.training_info["trained_with"] == [0, 2]
        info = together[layer].training_info
        assert {"ood_explained_variance", "ood_linear_baseline_ev", "ood_lm_loss_spliced"} <= info.keys()
        assert info["ood_eval_tokens"] > 1000  # the built-in prose sample


@pytest.mark.slow
def test_several_layers_resume_after_a_kill_to_the_same_weights(host, text, tmp_path, one_thread):
    settings = dict(layers=(0, 1, 2), k_anneal=0.5, eval_every=6)
    whole = train(tiny_config(host, text, tmp_path / "whole", **settings))

    def die_at_7(step, records):
        if step == 7:
            raise Kill

    with pytest.raises(Kill):
        train(tiny_config(host, text, tmp_path / "cut", **settings), on_step=die_at_7)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints" / "step_0000004").iterdir()) == [
        ".lorsa-surgery", "L0.safetensors", "L1.safetensors", "L2.safetensors", "rng.safetensors", "state.json"]
    resumed = train(tiny_config(host, text, tmp_path / "cut", resume=True, **settings))
    for layer in (0, 1, 2):
        assert_same_weights(state(whole[layer]), state(resumed[layer]))
        assert whole[layer].training_info["explained_variance"] == resumed[layer].training_info["explained_variance"]


def test_every_config_field_is_a_cli_option():
    from lorsa_surgery.cli.train import train as command

    names = {p.name for p in command.params}
    assert {f.name for f in training.dataclasses.fields(TrainConfig)} <= names
    helps = {p.name: p.help for p in command.params if isinstance(p, click.Option)}
    assert helps["lr"] and helps["init"].startswith("host:")  # help comes from the docstring under the field


@pytest.mark.slow
def test_training_sweep_example_runs_in_fast_mode(smollm2_gguf, tmp_path):
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples" / "training_sweep.py"), "--fast",
                           "--out", str(tmp_path), "--threads", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| old") or line.startswith("| new")]
    assert len(rows) == 2
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["init"] for r in results] == ["qk", "host"] and all(r["ood_eval_tokens"] > 1000 for r in results)


# ---- every layer at once ---------------------------------------------------------------------------------------


def test_layer_specs():
    from lorsa_surgery.training.config import parse_layers

    assert parse_layers("all") == "all" and parse_layers(["all"]) == "all"
    assert parse_layers(("0-2", "7")) == (0, 1, 2, 7) and parse_layers("3, 5-6") == (3, 5, 6) and parse_layers(4) == (4,)
    for bad, message in (("5-3", "backwards"), ("1,1", "distinct"), ("x", "ranges such as"), ("-1", "ranges such as"),
                         ((), "at least one"), (True, "ranges such as"), (("all", "3"), "ranges such as")):
        with pytest.raises(LorsaSurgeryError, match=message):
            parse_layers(bad)
    config = TrainConfig(model="m", layers="all", out="o")
    assert config.layer_list(30) == tuple(range(30)) and config.to_dict()["layers"] == "all"
    with pytest.raises(LorsaSurgeryError, match="out of range"):
        TrainConfig(model="m", layers="2-4", out="o").layer_list(4)
    with pytest.raises(LorsaSurgeryError, match="drop the activation cache"):
        TrainConfig(model="m", layers=1, out="o", inputs="replaced", cache_dir="c")


@torch.no_grad()
def test_replaced_capture_feeds_each_layer_what_the_replaced_layers_below_hand_on(host):
    from lorsa_surgery.training.trainer import capture_layers, capture_replaced

    model = tf.AutoModelForCausalLM.from_pretrained(host).eval()
    ids = torch.randint(4, 300, (2, 12))
    original = capture_layers(model, [0, 1, 2], ids)
    exact = capture_replaced(model, {layer: exact_copy(model, layer) for layer in (0, 1, 2)}, ids)
    for layer in (0, 1, 2):  # exact copies change nothing
        assert torch.allclose(exact[layer][0], original[layer][0], atol=1e-5)
        assert torch.allclose(exact[layer][1], original[layer][1], atol=1e-5)
    worse = exact_copy(model, 0)
    worse.W_O.mul_(3.0)
    replaced = capture_replaced(model, {0: worse, 2: exact_copy(model, 2)}, ids)
    assert torch.equal(replaced[0][0], original[0][0]) and torch.allclose(replaced[0][1], original[0][1], atol=1e-6)
    assert not torch.allclose(replaced[2][0], original[2][0], atol=1e-3)  # layer 0's error reached layer 2's input
    # The target is the original attention on the replaced input, not the original run's output.
    assert torch.allclose(exact_copy(model, 2)(replaced[2][0]), replaced[2][1], atol=1e-5)
    assert not any(hasattr(layer.self_attn, "lorsa") for layer in model.model.layers)  # unspliced afterwards


def test_all_layers_from_one_pass_with_a_table_and_the_layers_together(host, text, tmp_path, one_thread):
    out = tmp_path / "all"
    args = ["train", str(host), "--layers", "all", "--heads", "32", "--k", "4", "--tokens", "512", "--text", str(text),
            "--out", str(out), "--batch-size", "4", "--context", "32", "--eval-tokens", "128", "--lm-loss-tokens", "64",
            "--lr", "3e-3", "--checkpoint-every", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = result.output.splitlines()
    assert [line.split()[0] for line in table if line.strip().startswith("L")] == ["L0", "L1", "L2"]
    together = json.loads((out / "together.json").read_text())
    assert together["layers"] == [0, 1, 2] and together["kl"] > 0 and together["ood_tokens"] > 0
    assert "All 3 layers spliced at once" in result.output
    assert json.loads((out / "train_config.json").read_text())["layers"] == [0, 1, 2]
    # Replaced inputs: the same run, each layer learning on what the (training) layers below hand on.
    replaced = train(tiny_config(host, text, tmp_path / "replaced", layers="all", tokens=512, checkpoint_every=0,
                                 inputs="replaced"))
    independent = {layer: Lorsa.from_pretrained(out / f"L{layer}") for layer in (0, 1, 2)}
    assert torch.equal(replaced[0].W_O, independent[0].W_O)  # nothing below layer 0: the same data, the same module
    assert not torch.allclose(replaced[2].W_O, independent[2].W_O)
    assert json.loads((tmp_path / "replaced" / "together.json").read_text())["kl"] > 0
    # The run folder splices as a whole (all=FOLDER), a layer given by number taking its own module.
    spliced = CliRunner().invoke(main, ["replace", str(host), "--lorsa", f"all={out}", "--lorsa", "1=from-attention",
                                        "--text", str(text), "--out", str(tmp_path / "patched"), "--json"])
    assert spliced.exit_code == 0, spliced.output
    root = json.loads((tmp_path / "patched" / "lorsa_surgery.json").read_text())
    assert sorted(root["layers"]) == ["0", "1", "2"]
    assert Lorsa.from_pretrained(tmp_path / "patched" / root["layers"]["1"]["folder"]).cfg.n_ov_heads == 2 * 4 * 16
    shutil.rmtree(out / "L2")
    partial = CliRunner().invoke(main, ["replace", str(host), "--lorsa", f"all={out}", "--out", str(tmp_path / "p2")])
    assert partial.exit_code != 0 and "has no module for layer 2 of 3" in partial.output
