"""`rlhf train`: steps 1 → 2 → 3 (method dpo: 1 → 2), each as its own `rlhf sft|reward|ppo|dpo` process.

Each runs under the DeepSpeed launcher when there are several processes, with its options written to
`RUN/configs/`, its output to `RUN/logs/`, and success judged by its summary.json. A finished step is
skipped (the step itself refuses to reuse one finished with other options); an interrupted one resumes
from its checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rlhf_engine.config.args import dataclass_from_args
from rlhf_engine.config.pipeline import PipelineConfig, step_values
from rlhf_engine.runtime.fencing import WATCH_ENV
from rlhf_engine.runtime.launch import LAUNCH_VARS
from rlhf_engine.stages.progress import EVERY_ENV
from rlhf_engine.stages.records import is_finished


class StepFailedError(RuntimeError):
    """A step of the pipeline did not finish; the message points at its log."""


def plan(cfg: PipelineConfig, sections: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each requested step's options, validated now — before anything runs or loads."""
    import argparse

    out = {}
    steps = cfg.steps()
    for step in sorted(set(cfg.step)):
        values = step_values(cfg, step, sections.get(steps[step].command, {}))
        dataclass_from_args(
            steps[step].config, argparse.Namespace(), file_values=values
        )  # raises with the field
        out[step] = values
    last = max(steps)  # the step that trains from all the others' outputs (PPO; DPO from SFT)
    if last in out:
        for needed in range(1, last):
            if needed not in out and not is_finished(cfg.step_dir(needed)):
                raise ValueError(
                    f"step {last} needs the finished step {needed} in {cfg.step_dir(needed)}; "
                    f"run it too (--step {needed} {last}) or point output_dir at a run that has it"
                )
    return out


def _run_logged(cmd: list[str], log: Path) -> int:
    """Run `cmd`, copying its output to the console and to `log`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env[WATCH_ENV] = str(os.getpid())  # a step stops when the pipeline ends (fencing.py)
    env["PYTHONUNBUFFERED"] = "1"  # its lines (progress included) reach the console and the log as written
    with (
        open(log, "a") as f,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()  # bounded: its output ended, so it is exiting


def run_pipeline(cfg: PipelineConfig, sections: dict[str, dict[str, Any]]) -> Path | None:
    """Run the steps; returns the chat model's folder (step 3's actor, DPO's model, else step 1's model),
    or None when only the reward model ran (it is no chat model)."""
    steps = plan(cfg, sections)
    out = Path(cfg.output_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    procs = cfg.num_gpus if cfg.deployment_type != "single_gpu" else 1
    for step, values in steps.items():
        title, command = cfg.steps()[step].title, cfg.steps()[step].command
        name = cfg.step_dir(step).name
        config_file = out / "configs" / f"{name}.yaml"
        attempt = config_file.with_suffix(".next.yaml")  # becomes {name}.yaml once the step has run with it
        attempt.write_text(yaml.safe_dump(values, sort_keys=True))
        if is_finished(cfg.step_dir(step)):
            print(f"==> {title}: finished earlier in {cfg.step_dir(step)}; checking its options", flush=True)
        else:
            print(
                f"==> {title}: options in {config_file}, log in {out / 'logs' / (name + '.log')}; progress "
                f"every {os.environ.get(EVERY_ENV, '10')} s",
                flush=True,
            )
        cmd = [sys.executable, "-m", "rlhf_engine.cli", command, "--config", str(attempt)]
        if procs > 1 or cfg.hostfile:
            cmd += ["--num-gpus", str(procs)] + (["--hostfile", cfg.hostfile] if cfg.hostfile else [])
        started = time.monotonic()
        summary = cfg.step_dir(step) / "summary.json"
        before = summary.stat().st_mtime_ns if summary.is_file() else None
        code = _run_logged(cmd, out / "logs" / f"{name}.log")
        written_now = summary.is_file() and summary.stat().st_mtime_ns != before
        # success is the summary, not the exit status (multi-process CPU runs can abort after
        # finishing); but a step that refused to run (e.g. finished with other options) fails
        if not (written_now or (code == 0 and summary.is_file())):
            attempt.unlink(missing_ok=True)
            raise StepFailedError(
                f"{title} did not finish (exit status {code}); see {out / 'logs' / (name + '.log')}"
            )
        attempt.replace(config_file)
        print(f"==> {title}: done in {time.monotonic() - started:.0f} s", flush=True)
    if 3 in steps:
        return cfg.step_dir(3) / "actor"
    if cfg.method == "dpo" and 2 in steps:
        return cfg.step_dir(2)
    return cfg.step_dir(1) if 1 in steps else None
