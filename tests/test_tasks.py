"""Multi-hop task generators, tokenizers, solvers, and GPT-J training on them."""

import collections
import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.cli import main
from lorsa_surgery.multihop import tasks as M
from lorsa_surgery.multihop import train as TR


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brute_force_letter(tokens):
    """Follow the letter-task rule by scanning every earlier token, counting matches at each hop."""
    here, hops = len(tokens) - 1, 0
    while tokens[here][1] in M.PAIR_LETTERS:
        found = [p for p, t in enumerate(tokens[:here]) if t[0] == tokens[here][1]]
        assert len(found) == 1, "the match must be unique"
        here, hops = found[0], hops + 1
    return tokens[here], hops, here


def _brute_force_number(tokens):
    here, hops = len(tokens) - 1, 0
    while tokens[here] in M.INTEGERS:
        here, hops = here - int(tokens[here]), hops + 1
    return tokens[here], hops, here


@pytest.mark.parametrize("task", M.TASKS)
def test_thousands_of_examples_are_balanced_and_solved(task):
    n = 4000
    examples = M.generate(task, n, seed=3)
    solver = _brute_force_letter if task == "letter" else _brute_force_number
    for e in examples:
        assert len(e.tokens) == M.WINDOW + M.PRE_TARGET + 1
        assert solver(e.tokens) == (e.answer, e.hops, e.answer_position)
        assert M.solve(task, e.tokens) == (e.answer, e.hops, e.answer_position)
        window = M.SYMBOLS if task == "number" else M.LETTER_DIGITS
        rest = M.INTEGERS if task == "number" else M.LETTER_LETTERS
        assert all(t in window for t in e.tokens[: M.WINDOW]) and all(t in rest for t in e.tokens[M.WINDOW :])
    assert collections.Counter(e.hops for e in examples) == {h: n // 4 for h in range(1, 5)}
    assert collections.Counter(e.answer_position for e in examples) == {p: n // 8 for p in range(8)}
    answers = collections.Counter(e.answer for e in examples)
    n_answers = len(M.SYMBOLS) if task == "number" else len(M.LETTER_DIGITS)
    assert len(answers) == n_answers and max(answers.values()) - min(answers.values()) <= 1
    assert len({tuple(e.tokens) for e in examples}) > 0.99 * n


@pytest.mark.parametrize("task", M.TASKS)
def test_extra_window_tokens_go_before_the_answer_window(task):
    extra = 40
    for e in M.generate(task, 1000, seed=1, extra=extra):
        assert len(e.tokens) == M.WINDOW + M.PRE_TARGET + 1 + extra
        assert extra <= e.answer_position < extra + M.WINDOW
        assert M.solve(task, e.tokens) == (e.answer, e.hops, e.answer_position)


def test_generation_is_seeded():
    assert M.generate("letter", 50, seed=7) == M.generate("letter", 50, seed=7)
    assert M.generate("letter", 50, seed=7) != M.generate("letter", 50, seed=8)
    with pytest.raises(LorsaSurgeryError, match="Unknown task"):
        M.generate("colour", 5)


def test_solvers_reject_bad_prompts():
    tokens = [e for e in M.generate("letter", 1, seed=0)[0].tokens]
    wanted = tokens[-1][1]
    tokens[0] = wanted + "1"
    tokens[1] = wanted + "2"
    with pytest.raises(LorsaSurgeryError, match="exactly one"):
        M.solve_letter(tokens)
    with pytest.raises(LorsaSurgeryError, match="before its start"):
        M.solve_number(["a", "b", "9"])


def test_tokenizer_round_trip_and_files(tmp_path):
    for task in M.TASKS:
        tok = M.TaskTokenizer(task)
        examples = M.generate(task, 20, seed=2)
        ids, answers = tok.encode_examples(examples)
        assert ids.shape == (20, 17) and ids.max() < len(tok)
        assert tok.decode(ids[0]) == examples[0].tokens and tok.decode(answers)[0] == examples[0].answer
        assert len(set(tok.vocab)) == len(tok.vocab)
        path = M.save_examples(examples, tmp_path / f"{task}.jsonl")
        assert M.load_examples(path) == examples
    with pytest.raises(LorsaSurgeryError, match="vocabulary"):
        M.TaskTokenizer("number").encode(["a1"])
    with pytest.raises(LorsaSurgeryError):
        M.load_examples(tmp_path / "missing.jsonl")


def test_config_validation_and_presets():
    assert TR.PRESETS["paper"].n_layer == 12 and TR.PRESETS["paper"].lr == 1e-4
    assert TR.preset("small", task="number").task == "number"
    with pytest.raises(LorsaSurgeryError):
        TR.TaskTrainConfig(task="colour")
    with pytest.raises(LorsaSurgeryError):
        TR.TaskTrainConfig(n_embd=30, n_head=4)
    with pytest.raises(LorsaSurgeryError):
        TR.preset("huge")
    for bad in ({"hops": (0, 2)}, {"hops": ()}, {"rotary_base": 1.0}, {"train_extra": -1}, {"train_extra": 2000}):
        with pytest.raises(LorsaSurgeryError):
            TR.preset("small", **bad)


def test_generate_draws_only_the_hop_counts_asked_for():
    assert collections.Counter(e.hops for e in M.generate("number", 90, hops=(3, 4, 4))) == {3: 30, 4: 60}
    assert M.generate("letter", 40, seed=5) == M.generate("letter", 40, seed=5, hops=(1, 2, 3, 4))
    with pytest.raises(LorsaSurgeryError):
        M.generate("letter", 4, hops=(5,))


def test_every_training_setting_is_an_option_of_tasks_train_and_reaches_the_run(tmp_path, monkeypatch):
    calls = []
    real_generate = TR.generate
    monkeypatch.setattr(TR, "generate", lambda *a, **k: calls.append(k) or real_generate(*a, **k))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "tasks", "train", "letter", str(run), "--preset", "small", "--n-layer", "1", "--n-embd", "16", "--steps", "6",
        "--batch-size", "4", "--eval-examples", "8", "--eval-every", "6", "--checkpoint-steps", "6", "--dropout", "0",
        "--weight-decay", "0.1", "--betas", "0.9,0.99", "--rotary-base", "500", "--train-extra", "8", "--hops", "3,4"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "step_000006" / "trainer.json").read_text())["config"]
    assert config == {**json.loads(json.dumps(TR.asdict(TR.PRESETS["small"]))), "n_layer": 1, "n_embd": 16, "steps": 6,
                      "batch_size": 4, "eval_examples": 8, "eval_every": 6, "checkpoint_steps": [6], "dropout": 0.0,
                      "weight_decay": 0.1, "betas": [0.9, 0.99], "rotary_base": 500.0, "train_extra": 8, "hops": [3, 4]}
    training_calls = [k for k in calls if k.get("seed", "").startswith("train-")]
    assert len(training_calls) == 6 and all(k["hops"] == (3, 4) and 0 <= k["extra"] <= 8 for k in training_calls)
    assert len({k["extra"] for k in training_calls}) > 1  # the window's distance varies from step to step


def test_a_rotary_base_other_than_gptjs_is_built_and_survives_a_reload(tmp_path):
    config = TR.preset("small", n_layer=1, n_embd=16, rotary_base=500.0)
    def table_of(model):  # one table per model, or per attention module in older transformers releases
        return next(m.embed_positions for m in model.modules() if isinstance(getattr(m, "embed_positions", None), torch.Tensor))

    model = TR.build_model(config)
    table = table_of(model)
    angles = torch.arange(table.shape[0], dtype=torch.float64)[:, None] * 500.0 ** (-torch.arange(8) / 8)
    torch.testing.assert_close(table, torch.cat((angles.sin(), angles.cos()), -1).float())
    default = table_of(TR.build_model(replace(config, rotary_base=10000.0)))
    assert not torch.allclose(table, default)
    model.save_pretrained(tmp_path)
    (tmp_path / "trainer.json").write_text(json.dumps({"task": "letter", "step": 0, "config": TR.asdict(config)}))
    loaded, _ = TR.load_checkpoint(tmp_path)
    assert torch.equal(table_of(loaded), table)
    assert loaded.config.rope_theta == 500.0
    from lorsa_surgery.host.arch import arch_for

    assert arch_for(loaded).rotary(loaded.config, 0)["rotary_base"] == 500.0


TINY = TR.preset(
    "small", task="letter", n_layer=1, steps=40, dropout=0.0, warmup_steps=5,
    checkpoint_steps=(0, 20, 40), eval_every=20, eval_examples=64, batch_size=32,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-layer letter model trained for 40 steps: (run folder, history)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    return run, TR.train(TINY, run, progress=False)


@pytest.mark.slow
def test_tiny_training_learns_checkpoints_and_resumes(tiny_run, tmp_path):
    run, history = tiny_run
    assert [h["step"] for h in history] == [0, 20, 40]
    assert history[-1]["loss"] < 4.4, "below the 4.85 of uniform guessing over the vocabulary"
    assert set(history[-1]["per_hop"]) == {1, 2, 3, 4}
    steps = sorted(p.name for p in run.glob("step_*"))
    assert steps == ["step_000000", "step_000020", "step_000040"]
    model, record = TR.load_checkpoint(run / "step_000040")
    assert record["task"] == "letter" and record["step"] == 40

    # Interrupt after step 20: the resumed run must end with the same weights as the uninterrupted one.
    (tmp_path / "cut").mkdir()
    for name in ("step_000000", "step_000020"):
        src = run / name
        (tmp_path / "cut" / name).mkdir()
        for f in src.iterdir():
            (tmp_path / "cut" / name / f.name).write_bytes(f.read_bytes())
    (tmp_path / "cut" / "history.json").write_text((run / "history.json").read_text())
    (tmp_path / "cut" / ".lorsa-surgery").write_text((run / ".lorsa-surgery").read_text())  # the run folder is the toolkit's
    resumed = TR.train(TINY, tmp_path / "cut", progress=False)
    assert [h["step"] for h in resumed] == [0, 20, 40]
    again, _ = TR.load_checkpoint(tmp_path / "cut" / "step_000040")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)

    with pytest.raises(LorsaSurgeryError, match="other settings"):
        TR.train(replace(TINY, lr=5e-3), run, progress=False)

    sweep = TR.length_sweep(model, "letter", [0, 8], n=32, progress=False)
    assert set(sweep) == {17, 25}
    tok = M.TaskTokenizer("letter")
    for extra in (0, 8):  # one example at a time, by hand: the same examples, the same accuracy
        examples = M.generate("letter", 32, seed="length", extra=extra)
        right = 0
        for example in examples:
            ids, answer = tok.encode_examples([example])
            with torch.no_grad():
                right += int(model(ids).logits[0, -1].argmax()) == int(answer[0])
        assert sweep[17 + extra]["accuracy"] == pytest.approx(right / 32)
    records = TR.checkpoint_scores(run, n_prompts=2, progress=False)
    assert [r["step"] for r in records] == [0, 20, 40] and len(records[0]["positional"]) == 1
    for fn, args in (
        (TR.plot_scores_over_training, (records,)),
        (TR.plot_pure_heads, (records, history)),
        (TR.plot_accuracy_vs_length, ({"letter": sweep},)),
    ):
        path = fn(*args, tmp_path / f"{fn.__name__}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "history.json").read_text())[-1]["step"] == 40


@pytest.mark.slow
def test_cli(tiny_run, tmp_path):
    run, _ = tiny_run
    cli = CliRunner()
    data = tmp_path / "letter.jsonl"
    result = cli.invoke(main, ["tasks", "make", "letter", str(data), "-n", "40", "--extra", "3"])
    assert result.exit_code == 0 and len(M.load_examples(data)) == 40
    result = cli.invoke(main, ["tasks", "eval", str(run / "step_000040"), "--data", str(data), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["task"] == "letter"
    direct = TR.evaluate(TR.load_checkpoint(run / "step_000040")[0], "letter", M.load_examples(data))
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(direct["accuracy"])
    result = cli.invoke(main, ["tasks", "extrapolate", str(run / "step_000040"), "--extras", "0,4", "-n", "16",
                               "--out", str(tmp_path / "len")])
    assert result.exit_code == 0 and set(json.loads((tmp_path / "len" / "length.json").read_text())["letter (step_000040)"]) == {"17", "21"}
    result = cli.invoke(main, ["heads", "classify", str(run / "step_000040"), "-n", "2", "--json",
                               "--lorsa", "0=from-attention"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["lorsa"]["positional"][0] == pytest.approx(out["mhsa"]["positional"][0], abs=1e-5)
    result = cli.invoke(main, ["heads", "classify", str(run / "step_000040"), "--prompts", "match"])
    assert result.exit_code == 1 and "use --prompts task" in result.output
    result = cli.invoke(main, ["tasks", "train", "letter", str(tmp_path / "t"), "--preset", "small", "--n-layer", "1",
                               "--steps", "3", "--checkpoint-steps", "x"])
    assert result.exit_code == 2 and "--checkpoint-steps" in result.output


@pytest.fixture(scope="module")
def outside_model(tmp_path_factory):
    """A 2-layer GPT-J trained here, outside the toolkit's trainer, on the letter task in a vocabulary of its own
    (200 ids, the task's symbols at shuffled places among them), saved as a plain Hugging Face folder with its map."""
    import random

    from transformers import GPTJConfig, GPTJForCausalLM

    folder = tmp_path_factory.mktemp("outside") / "model"
    symbols = M.task_symbols("letter")
    ids = random.Random(3).sample(range(200), len(symbols))
    token_map = dict(zip(symbols, ids))
    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(vocab_size=200, n_positions=128, n_embd=64, n_layer=2, n_head=1, rotary_dim=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                       bos_token_id=None, eos_token_id=None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    encode = lambda examples: (torch.tensor([[token_map[t] for t in e.tokens] for e in examples]),
                               torch.tensor([token_map[e.answer] for e in examples]))
    for step in range(250):
        x, y = encode(M.generate("letter", 64, seed=f"outside-{step}"))
        loss = torch.nn.functional.cross_entropy(model(x, use_cache=False).logits[:, -1], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    (folder.parent / "map.json").write_text(json.dumps(token_map))
    return folder, folder.parent / "map.json", model.eval(), encode


def test_a_model_trained_outside_the_toolkit_is_evaluated_through_a_token_map(outside_model, tmp_path):
    folder, map_path, model, encode = outside_model
    assert not (folder / "trainer.json").exists()
    examples = M.generate("letter", 256, seed="outside-eval")
    x, y = encode(examples)
    with torch.no_grad():
        predicted = model(x, use_cache=False).logits[:, -1].argmax(-1)
    direct = float((predicted == y).float().mean())
    assert direct > 0.05 and len(set(predicted.tolist())) > 20  # it learned something and answers vary with the input
    data = tmp_path / "eval.jsonl"
    M.save_examples(examples, data)
    cli = CliRunner()
    result = cli.invoke(main, ["tasks", "eval", str(folder), "--task", "letter", "--token-map", str(map_path),
                               "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(direct, abs=1e-9)
    mapping = json.loads(map_path.read_text())
    rotated = tmp_path / "rotated.json"  # every symbol given its neighbour's id: the map is what decides
    rotated.write_text(json.dumps(dict(zip(mapping, list(mapping.values())[1:] + list(mapping.values())[:1]))))
    result = cli.invoke(main, ["tasks", "eval", str(folder), "--task", "letter", "--token-map", str(rotated),
                               "--data", str(data), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["accuracy"] != pytest.approx(direct, abs=1e-3)
    result = cli.invoke(main, ["tasks", "extrapolate", str(folder), "--task", "letter", "--token-map", str(map_path),
                               "--extras", "0,8", "-n", "16"])
    assert result.exit_code == 0 and "25 tokens" in result.output, result.output
    result = cli.invoke(main, ["heads", "classify", str(folder), "--task", "letter", "--token-map", str(map_path),
                               "-n", "4", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["mhsa"]
    assert len(scores["labels"]) == 2 and 0 <= scores["positional"][0][0] <= 1
    assert scores["prompts"] == 4 and len(scores["positional_spread"]) == len(scores["borderline"]) == 2

    incomplete = tmp_path / "short.json"
    incomplete.write_text(json.dumps(dict(list(json.loads(map_path.read_text()).items())[:-3])))
    result = cli.invoke(main, ["tasks", "eval", str(folder), "--task", "letter", "--token-map", str(incomplete)])
    assert result.exit_code == 1 and "lacks 3 of the letter task's" in result.output
    result = cli.invoke(main, ["tasks", "eval", str(folder)])
    assert result.exit_code == 1 and "--token-map" in result.output


def test_a_malformed_checkpoint_record_is_one_line(tmp_path):
    (tmp_path / "trainer.json").write_text('{"task": "letter",')
    for args in (["heads", "classify", str(tmp_path)], ["tasks", "eval", str(tmp_path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "trainer.json is not valid JSON" in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
