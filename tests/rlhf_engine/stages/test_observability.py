"""Watching a step: a live progress line (a bar on a terminal, plain lines in a log or a pipe) and
TensorBoard (DeepSpeed-Chat's --enable_tensorboard): every number of metrics.jsonl as a scalar,
evaluations, and step 3's rollouts as text — read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from rlhf_engine.config.train import SFTConfig, Tracking
from rlhf_engine.stages.progress import Progress
from rlhf_engine.stages.records import Records, read_jsonl, wandb_settings

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
    assert re.fullmatch(
        r"step 1 \(SFT\): step 1/10 \(10%\)  loss 2\.0000  samples/s 12\.5  ETA \d+s", lines[1]
    ), lines
    assert re.fullmatch(
        r"step 1 \(SFT\): step 10/10 \(100%\)  loss 0\.2000  samples/s 12\.5  took \d+s", lines[-1]
    )
    assert len(lines) == 3, lines
    resumed = io.StringIO()
    q = Progress("step 3 (PPO)", stream=resumed, every_s=0)
    q.start(8, done=4)
    q.update({"step": 5, "reward_mean": 0.25, "kl_to_ref": 0.031})
    header, line = resumed.getvalue().splitlines()  # the header and one progress line, nothing else
    assert header == "step 3 (PPO): 8 steps, resuming at step 4"
    assert re.fullmatch(r"step 3 \(PPO\): step 5/8 \(62%\)  reward 0\.250  kl 0\.031  ETA \d+s", line), line
    terminal = _Terminal()
    bar = Progress("step 2 (reward model)", stream=terminal)
    bar.start(4)
    bar.update({"step": 2, "loss": 0.5, "accuracy": 0.75})
    bar.close()
    assert "step 2 (reward model)" in terminal.getvalue() and "2/4" in terminal.getvalue()
    assert "loss 0.5000  acc 0.750" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_a_tensorboard_path_outside_the_run_is_refused(tmp_path: Path) -> None:
    def config(path: str) -> SFTConfig:
        return SFTConfig(
            model_name_or_path="m", output_dir=str(tmp_path), tracking=Tracking(tensorboard_path=path)
        )

    with pytest.raises(ValueError, match="tensorboard_path '/tmp/elsewhere' is outside output_dir"):
        config("/tmp/elsewhere")
    with pytest.raises(ValueError, match="tensorboard_path '../up' is outside"):
        config("../up")
    config("tb/sft")  # inside: fine


def test_a_step_reports_to_weights_and_biases_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI's wandb integration with WANDB_MODE=offline (a local run, no network): metrics,
    evaluations and rollouts reach the step's run; a resumed step goes on in the same run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "never-written-anywhere-0123456789abcdef01234567")
    cfg = SFTConfig(
        model_name_or_path="m",
        output_dir=str(tmp_path / "run"),
        tracking=Tracking(wandb_project="rlhf-test", wandb_tags=["ci"]),
    )
    step_dir = tmp_path / "run" / "step1_sft"
    settings = wandb_settings(cfg, step_dir)
    assert settings is not None and settings["project"] == "rlhf-test" and settings["name"] == "run-step1_sft"
    assert settings["config"]["learning_rate"] == cfg.learning_rate and settings["tags"] == ["ci"]
    records = Records(step_dir, enabled=True, title="step 1 (SFT)", wandb=settings)
    records.event("step_started", "go", total_steps=2, global_step=0)
    records.metric(step=1, loss=2.0, lr=1e-3)
    records.metric(step=2, loss=1.5, lr=1e-3)
    records.event("eval", "eval at step 2", global_step=2, loss=1.25, perplexity=3.5)
    records.rollouts(
        "rollouts.jsonl", [{"step": 2, "prompt": "q", "answer": "a", "reward": 1.0, "kl": 0.1}], 2
    )
    run_id = records._run().id
    records.close()
    files = list(step_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    history = _wandb_history(files[0])
    assert (
        history[1]["train/loss"] == 2.0 and history[2]["train/loss"] == 1.5 and history[2]["train/lr"] == 1e-3
    )
    assert history[2]["eval/perplexity"] == 3.5 and history[2]["rollouts/nrows"] == 1
    assert not any(b"never-written-anywhere" in f.read_bytes() for f in step_dir.rglob("*") if f.is_file())
    resumed = Records(step_dir, enabled=True, wandb=settings)
    assert resumed._run().id == run_id
    resumed.close()


def _wandb_history(path: Path) -> dict[int, dict[str, object]]:
    """step → logged values, read from an offline run's .wandb file (LevelDB's log format: 32 KiB blocks
    of records with a 7-byte header, after a 7-byte file header; each record a wandb Record message)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    history: dict[int, dict[str, object]] = {}
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            # wandb is typed, but its generated protobuf modules define their messages at run time
            record = pb.Record()  # type: ignore[attr-defined]
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
                }
                history.setdefault(record.history.step.num, {}).update(items)
    return history


def _scalars(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {
        tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }
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
