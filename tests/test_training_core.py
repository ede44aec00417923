"""The training core shared by Lorsa training, healing and the multi-hop trainer (schedule, held-out split, metrics log,
resume check), their configs, and the one LM loss, BOS rule and device lookup the package keeps."""

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.cli.config import field_docs
from lorsa_surgery.host.corpus import special_ids
from lorsa_surgery.host.metrics import lm_loss_sums, next_token_loss
from lorsa_surgery.host.placement import execution_device, input_device
from lorsa_surgery.multihop.config import TaskTrainConfig
from lorsa_surgery.training import core
from lorsa_surgery.training.config import HealConfig, TrainConfig


# ---- the schedule ----------------------------------------------------------------------------------------------


def test_the_schedule_warms_up_holds_and_cools_down():
    factors = [core.lr_factor(step, steps=10, warmup=2, cooldown=4) for step in range(11)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("steps,warm", [(10, 3), (7, 0), (5, 5), (4, 9), (1, 1)])
def test_warm_up_then_decay_to_zero_is_the_schedule_healing_and_the_multihop_trainer_had(steps, warm):
    """Their own formula before the core: linear warm-up, then linear decay over the rest of the run."""
    def before(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    for step in range(steps):
        assert core.lr_factor(step, steps, warm, max(0, steps - warm)) == before(step)


def test_steps_cover_the_token_budget():
    assert core.steps_for(1000, 4, 32) == 8 and core.steps_for(1024, 4, 32) == 8 and core.steps_for(1025, 4, 32) == 9


# ---- the held-out split --------------------------------------------------------------------------------------


def test_the_held_out_split_is_seeded_disjoint_and_whole():
    held, train = core.held_out_split(50, eval_tokens=10 * 32, context=32, seed=3)
    assert len(held) == 10 and held == sorted(held) and sorted(held + train) == list(range(50))
    assert (held, train) == core.held_out_split(50, 320, 32, seed=3)
    assert held != core.held_out_split(50, 320, 32, seed=4)[0]
    assert core.held_out_split(5, eval_tokens=1, context=32, seed=0)[0].__len__() == 1  # at least one sequence


def test_too_little_text_for_the_held_out_split_is_refused():
    with pytest.raises(LorsaSurgeryError, match="The text gives 4 sequences of 32 tokens; need more than the 4 held out"):
        core.held_out_split(4, eval_tokens=128, context=32, seed=0)


# ---- the metrics log -------------------------------------------------------------------------------------------


def test_the_metrics_log_appends_lines_and_reads_back_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = core.MetricsLog(path)
    for step in (2, 4, 6):
        log.append({"step": step, "loss": 1.0 / step})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4, 6]

    resumed = core.MetricsLog(path, resume_at=4)
    assert [r["step"] for r in resumed.records] == [2, 4]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]  # the later lines are dropped
    resumed.append({"step": 6, "loss": 0.1})
    assert len(path.read_text().splitlines()) == 3

    reader = core.MetricsLog(path, resume_at=6, write=False)  # another process of the same run: reads, never writes
    reader.append({"step": 8})
    assert [r["step"] for r in reader.records] == [2, 4, 6, 8] and len(path.read_text().splitlines()) == 3
    assert core.MetricsLog(path).records == [] and path.read_text() == ""  # a fresh start empties the file
    memory = core.MetricsLog(None)
    memory.append({"step": 1})
    assert memory.records == [{"step": 1}]


# ---- resuming and diverging ---------------------------------------------------------------------------------------


def test_changed_settings_compare_as_json_holds_them():
    config = TaskTrainConfig(steps=10, checkpoint_steps=(0, 10))
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    assert core.changed_settings(saved, config) == []  # tuples saved as lists are the same settings
    assert core.changed_settings(saved, dataclasses.replace(config, lr=5e-3, hops=(1, 2))) == ["hops", "lr"]


def test_a_diverged_run_says_what_when_why_what_was_lost_and_what_to_do():
    with pytest.raises(LorsaSurgeryError) as refused:
        core.diverged("Healing", 3, "KL nan", "nothing was saved", "lower lr or lorsa_lr")
    assert str(refused.value) == "Healing diverged at step 3 (KL nan), so nothing was saved; lower lr or lorsa_lr."


def test_clipping_returns_the_norm_and_notices_a_nan():
    weight = nn.Parameter(torch.ones(4))
    weight.grad = torch.full((4,), 2.0)
    assert core.clip_gradients([weight], 1.0) == pytest.approx(4.0) and weight.grad.norm() == pytest.approx(1.0)
    weight.grad = torch.full((4,), 2.0)
    assert core.clip_gradients([weight], 0) == pytest.approx(4.0) and weight.grad.norm() == pytest.approx(4.0)  # 0: no clipping
    weight.grad = torch.tensor([float("nan"), 0, 0, 0])
    assert core.clip_gradients([weight], 1.0) != core.clip_gradients([weight], 1.0)


# ---- the configs ---------------------------------------------------------------------------------------------------


def test_each_trainer_has_its_own_config_under_its_own_name_with_a_docstring_per_field():
    configs = (TrainConfig, HealConfig, TaskTrainConfig)
    assert len({c.__name__ for c in configs}) == 3
    for cls in configs:
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


def test_the_configs_load_and_check_their_values_without_torch():
    code = ("import sys\n"
            "from lorsa_surgery.training.config import HealConfig, TrainConfig\n"
            "from lorsa_surgery.multihop.config import TaskTrainConfig, preset\n"
            "TrainConfig(model='m', layers=(1,), out='o', max_memory='0=1GiB'); HealConfig(); preset('small', task='number')\n"
            "try:\n    HealConfig(warmup=1.0)\nexcept Exception as e:\n    print(e)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["warmup must be a fraction below 1: the rate decays after it.", "[]"]


# ---- one LM loss, one BOS rule, one device lookup ------------------------------------------------------------------------


def test_the_lm_loss_counts_tokens_whose_predictor_is_real_too():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    losses, keep = next_token_loss(logits, ids, mask)
    assert keep.tolist() == [[False, True, True, True], [True, True, False, False]]
    torch.testing.assert_close(losses[0, 1:], F.cross_entropy(logits[0, 1:4], ids[0, 2:], reduction="none"))
    assert next_token_loss(logits, ids)[1].all()


def test_lm_loss_sums_add_up_the_batches():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 11)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return SimpleNamespace(logits=self.embed(input_ids))

    model, ids = Toy(), torch.randint(0, 11, (3, 6))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    total = lm_loss_sums(model, ids, mask, batch_size=2)
    with torch.no_grad():
        losses, keep = next_token_loss(model(ids).logits, ids, mask)
    assert total[1] == keep.sum() == 13 and float(total[0]) == pytest.approx(float(losses[keep].sum()), rel=1e-6)


def test_the_bos_rule():
    tok = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    assert special_ids(tok) == (1, 2, 2)
    assert special_ids(SimpleNamespace(bos_token_id=None, eos_token_id=2, pad_token_id=0)) == (2, 2, 0)
    assert special_ids(SimpleNamespace(bos_token_id=1, eos_token_id=None, pad_token_id=None)) == (1, 1, 1)
    with pytest.raises(LorsaSurgeryError, match="neither a BOS nor an EOS"):
        special_ids(SimpleNamespace(bos_token_id=None, eos_token_id=None, pad_token_id=None))


def test_the_execution_device_is_accelerates_then_the_weights():
    layer = nn.Linear(2, 2)
    assert execution_device(layer) == torch.device("cpu")
    layer._hf_hook = SimpleNamespace(execution_device="meta")  # what Accelerate records on a dispatched module
    assert execution_device(layer) == torch.device("meta")
    with torch.device("meta"):
        offloaded = nn.Linear(2, 2)
    assert execution_device(offloaded) == torch.device("cpu")
    model = SimpleNamespace(get_input_embeddings=lambda: layer)
    assert input_device(model) == torch.device("meta")
