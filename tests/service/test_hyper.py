"""OpenAI's hyperparameters with OpenAI's meaning (service/jobs/hyper.py): batch_size is examples per
optimiser step in every method, "auto" follows OpenAI's published rules, and reinforcement's own
hyperparameters become step 3's options."""

from __future__ import annotations

import pytest

from rlhf_engine.config.ppo import PPOConfig
from rlhf_engine.config.train import SFTConfig
from service.errors import InvalidRequestError
from service.jobs import hyper
from service.schemas import Hyperparameters, ReinforcementHyperparameters


def targets(hp: Hyperparameters | None, *, step: int = 1, rows: int | None = 1000, **kw: object) -> dict:
    options = {
        "cls": SFTConfig if step < 3 else PPOConfig,
        "section": {},
        "processes": 1,
        "actor_params_b": 0.0005,
        "has_validation": False,
        "validation_rows": None,
    } | kw
    return hyper.step_targets(hp, step=step, rows=rows, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rows", "batch"), [(10, 1), (1000, 2), (50_000, 100), (10**6, 256)])
def test_auto_batch_size_is_openais_share_of_the_rows(rows: int, batch: int) -> None:
    out = targets(None, rows=rows)
    assert out["per_device_train_batch_size"] * out["gradient_accumulation_steps"] == batch


@pytest.mark.parametrize(("rows", "epochs"), [(10, 10), (20, 5), (50, 3), (5000, 3), (20_000, 1), (1, 25)])
def test_auto_epochs_follow_the_cookbook_rule(rows: int, epochs: int) -> None:
    assert targets(None, rows=rows)["num_train_epochs"] == epochs


def test_a_batch_size_is_examples_per_step_split_into_micro_batches_and_accumulation() -> None:
    out = targets(Hyperparameters(batch_size=48), processes=2, section={"per_device_train_batch_size": 16})
    assert (out["per_device_train_batch_size"], out["gradient_accumulation_steps"]) == (12, 2)  # 12 × 2 × 2
    with pytest.raises(InvalidRequestError) as e:
        targets(Hyperparameters(batch_size=5), processes=2)
    assert e.value.param == "hyperparameters.batch_size" and "multiple of num_gpus" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        targets(Hyperparameters(batch_size=64), rows=20)
    assert "more than the 20 training rows" in e.value.message


def test_a_preset_or_config_beats_auto_but_never_a_given_value() -> None:
    section = {"per_device_train_batch_size": 8, "num_train_epochs": 2, "learning_rate": 1e-4}
    assert targets(None, section=section, actor_params_b=0.135) == {}
    given = targets(Hyperparameters(n_epochs=4, learning_rate_multiplier=2.0), section=section)
    assert given["num_train_epochs"] == 4 and given["learning_rate"] == pytest.approx(2e-4)


def test_auto_learning_rate_shrinks_with_the_model() -> None:
    assert "learning_rate" not in targets(None, actor_params_b=0.005)  # a tiny model: the step default
    lr = targets(None, actor_params_b=0.135)["learning_rate"]
    assert lr == pytest.approx(1e-3 / (135 / 10) ** 0.5, rel=1e-3)


def test_reinforcement_hyperparameters_become_step_3_options() -> None:
    hp = ReinforcementHyperparameters(
        batch_size=8, eval_interval=5, eval_samples=6, compute_multiplier=2.0, reasoning_effort="high"
    )
    out = targets(hp, step=3, validation_rows=10, section={"samples_per_prompt": 4})
    assert out["per_device_generation_batch_size"] == 8 and out["eval_interval"] == 5
    assert out["eval_max_rows"] == 6 and out["samples_per_prompt"] == 8 and out["max_answer_len"] == 512
    assert out["per_device_training_batch_size"] == 8 * 8  # one optimiser step takes a PPO step's answers
    with pytest.raises(InvalidRequestError) as e:
        targets(ReinforcementHyperparameters(eval_samples=11), step=3, validation_rows=10)
    assert e.value.param == "method.reinforcement.hyperparameters.eval_samples"


def test_a_validation_file_sets_about_ten_evaluations_on_a_sample() -> None:
    out = targets(Hyperparameters(batch_size=10, n_epochs=2), rows=500, has_validation=True)
    assert out["eval_interval"] == 10 and out["eval_sample_rows"] == 64  # 100 steps → every 10
    assert "eval_interval" not in targets(None, has_validation=True, section={"eval_interval": 3})


def test_with_the_rows_unknown_auto_keeps_the_step_defaults() -> None:
    """A dataset not read here (a hub id) or an estimate by size: "auto" has no rows to go by."""
    assert targets(None, rows=None) == {}
    assert targets(Hyperparameters(batch_size=4), rows=None)["per_device_train_batch_size"] == 4
