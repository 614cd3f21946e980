"""Watching a step: a live progress line (a bar on a terminal, plain lines in a log or a pipe) and
TensorBoard (DeepSpeed-Chat's --enable_tensorboard): every number of metrics.jsonl as a scalar,
evaluations, and step 3's rollouts as text — read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from rlhf_engine.config.train import SFTConfig
from rlhf_engine.stages.progress import Progress
from rlhf_engine.stages.records import read_jsonl

STEP_DIRS = {1: "step1_sft", 2: "step2_reward", 3: "step3_rlhf"}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_line_every_few_seconds_when_piped_and_a_bar_on_a_terminal() -> None:
    piped = io.StringIO()
    p = Progress("step 1 (SFT)", stream=piped, every_s=3600)  # only the first and the last line in an hour
    p.start(10)
    for step in range(1, 11):
        p.update({"step": step, "loss": 2.0 / step, "samples_per_s": 12.5})
    lines = piped.getvalue().splitlines()
    assert lines[0] == "step 1 (SFT): 10 steps"
    assert re.fullmatch(r"step 1 \(SFT\): step 1/10 \(10%\)  loss 2\.0000  samples/s 12\.5  ETA \d+s", lines[1]), lines
    assert re.fullmatch(r"step 1 \(SFT\): step 10/10 \(100%\)  loss 0\.2000  samples/s 12\.5  took \d+s", lines[-1])
    assert len(lines) == 3, lines
    resumed = io.StringIO()
    q = Progress("step 3 (PPO)", stream=resumed, every_s=0)
    q.start(8, done=4)
    q.update({"step": 5, "reward_mean": 0.25, "kl_to_ref": 0.031})
    assert resumed.getvalue().splitlines() == ["step 3 (PPO): 8 steps, resuming at step 4",
                                               resumed.getvalue().splitlines()[1]]  # fmt: skip
    assert "step 5/8 (62%)  reward 0.250  kl 0.031" in resumed.getvalue()
    terminal = _Terminal()
    bar = Progress("step 2 (reward model)", stream=terminal)
    bar.start(4)
    bar.update({"step": 2, "loss": 0.5, "accuracy": 0.75})
    bar.close()
    assert "step 2 (reward model)" in terminal.getvalue() and "2/4" in terminal.getvalue()
    assert "loss 0.5000  acc 0.750" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_a_tensorboard_path_outside_the_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tensorboard_path '/tmp/elsewhere' is outside output_dir"):
        SFTConfig(model_name_or_path="m", output_dir=str(tmp_path), tensorboard_path="/tmp/elsewhere")
    with pytest.raises(ValueError, match="tensorboard_path '../up' is outside"):
        SFTConfig(model_name_or_path="m", output_dir=str(tmp_path), tensorboard_path="../up")
    SFTConfig(model_name_or_path="m", output_dir=str(tmp_path), tensorboard_path="tb/sft")  # inside: fine


def _scalars(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}  # fmt: skip
    return scalars, texts


def test_rlhf_train_shows_progress_and_every_step_writes_tensorboard(pipeline_run: Path) -> None:
    stdout = (pipeline_run / "train.stdout").read_text()
    for title, step in (("step 1 (SFT)", 1), ("step 2 (reward model)", 2), ("step 3 (PPO)", 3)):
        metrics = read_jsonl(pipeline_run / STEP_DIRS[step] / "metrics.jsonl")
        total = len(metrics)
        # relayed by `rlhf train` as the step ran, ending at 100% (and in the step's log, line by line)
        assert f"{title}: step {total}/{total} (100%)" in stdout, stdout[-2000:]
        log = (pipeline_run / "logs" / f"{STEP_DIRS[step]}.log").read_text()
        assert f"{title}: step {total}/{total} (100%)" in log
        scalars, texts = _scalars(pipeline_run / STEP_DIRS[step] / "tensorboard")
        key = "loss" if step < 3 else "reward_mean"
        assert [s for s, _ in scalars[f"train/{key}"]] == [m["step"] for m in metrics]
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([m[key] for m in metrics], rel=1e-6)
        assert f"train/{'lr' if step < 3 else 'kl_to_ref'}" in scalars and "train/samples_per_s" in scalars
        evals = [t for t in scalars if t.startswith("eval/")]
        assert evals, sorted(scalars)
        if step == 3:
            rollouts = read_jsonl(pipeline_run / STEP_DIRS[3] / "rollouts.jsonl")
            shown = texts["rollouts/text_summary"]
            assert [s for s, _ in shown] == sorted({r["step"] for r in rollouts})
            first = [r for r in rollouts if r["step"] == shown[0][0]]
            assert all(r["answer"].replace("|", "\\|").replace("\n", " ")[:40] in shown[0][1] for r in first)
            assert {"eval/actor/reward_mean", "eval/ema_actor/reward_mean"} <= set(scalars), sorted(scalars)
