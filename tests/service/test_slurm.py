"""Jobs through a real Slurm (Debian's slurm-wlm + munge, started by the fixture like PostgreSQL: two nodes
on this machine, a slurmd each with this machine's CPUs): the `slurm` launch backend submits each step with
sbatch, follows it with squeue/scontrol, cancels it with scancel, and keeps one trainer per step whatever
dies; a job with `nodes: 2` runs one rank on each node.

Eight real nodes cannot exist here: the 8 nodes × 8 GPUs script is checked as generated and its rank
arithmetic executed by bash with Slurm's own variables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from rlhf_engine.runtime.launch import SRUN_RANK_ENV, launch_command
from service.db.models import Job, JobMetric
from service.db.session import session_scope
from service.services import cluster as cluster_svc
from service.settings import Settings
from tests.helpers import slurm
from tests.service.conftest import Stack, events, wait_for
from tests.service.test_one_trainer import TrainerCount
from workers import launchers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[slurm.Cluster]:
    c = slurm.start(tmp_path_factory.mktemp("slurm"), nodes=2)
    with pytest.MonkeyPatch.context() as mp:  # the API (in this process) asks this cluster too
        mp.setenv("SLURM_CONF", str(c.conf))
        yield c
    c.stop()


@pytest.fixture(scope="module")
def slurm_stack(
    cluster: slurm.Cluster,
    make_stack: Callable[..., Stack],
    new_pg: Callable[[], str],
    new_redis: Callable[[], str],
) -> Stack:
    """PostgreSQL, Redis and the API of a Slurm-backed server (up to 2 nodes per job); each test starts
    its own training worker, pointed at the fixture's cluster."""
    s = make_stack(
        database_url=new_pg(),
        redis_url=new_redis(),
        launch_backend="slurm",
        slurm_poll_s=1.0,
        max_nodes_per_job=4,
        max_gpus_per_job=16,
    )
    s.env |= cluster.env
    return s


def _step_dir(stack: Stack, job_id: str, name: str) -> Path:
    with session_scope(stack.settings.db_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return Path(job.output_dir) / name


def _slurm_job(step_dir: Path) -> dict[str, Any]:
    return json.loads((step_dir / launchers.SLURM_JOB_FILE).read_text())


def _wait_for_step(stack: Stack, job_id: str, global_step: int, timeout: float = 240) -> None:
    """Until the job's running step has logged `global_step` (past a checkpoint: one every 25 steps)."""
    deadline = time.monotonic() + timeout
    while max((g for _, g in _metric_rows(stack, job_id)), default=0) < global_step:
        assert time.monotonic() < deadline, f"job {job_id} did not reach step {global_step} in {timeout} s"
        time.sleep(0.2)


def _metric_rows(stack: Stack, job_id: str) -> list[tuple[int, int]]:
    with session_scope(stack.settings.db_url) as s:
        return [
            (r.step, r.global_step)
            for r in s.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.id))
        ]


# ---------------------------------------------------------------------------- the generated script


def test_the_8_node_script_gives_every_rank_its_place(cluster: slurm.Cluster, tmp_path: Path) -> None:
    """8 nodes × 8 GPUs on paper: the sbatch script asks for them, the master is the first host of
    SLURM_JOB_NODELIST, and each srun task's rank, local rank and world size come from Slurm's."""
    settings = Settings(
        data_dir=tmp_path,
        launch_backend="slurm",
        max_nodes_per_job=8,
        slurm_partition="gpu",
        slurm_account="lab",
        slurm_extra_args=["--qos=high"],
    )
    spec = launchers.StepSpec(
        job_id="ftjob-abc",
        step=3,
        attempt=2,
        argv=["/venv/bin/python", "-m", "rlhf_engine.cli", "ppo", "--config", "/runs/c/step3 ppo.yaml"],
        env={},
        log=tmp_path / "step3.log",
        step_dir=tmp_path / "step3_rlhf",
        nodes=8,
        per_node=8,
        gpus=True,
        estimate_s=7200,
    )
    script = launchers.batch_script(spec, settings)
    for line in (
        "#SBATCH --nodes=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --time=0-06:00:00",  # 3 × the 2 h estimate
        "#SBATCH --requeue",
    ):
        assert line in script.splitlines(), (line, script)
    assert "'/runs/c/step3 ppo.yaml' --num-gpus 8 --nodes 8 --launcher srun" in script  # quoted once

    # the master address and port, as the batch shell computes them from Slurm's variables
    prelude = [ln for ln in script.splitlines() if ln.startswith(("MASTER_", "export MASTER"))]
    out = subprocess.run(
        ["bash", "-c", "\n".join([*prelude, 'echo "$MASTER_ADDR:$MASTER_PORT"'])],
        env=os.environ | cluster.env | {"SLURM_JOB_NODELIST": "gpu[07-14]", "SLURM_JOB_ID": "123456"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert out == "gpu07:23456"

    # the top process's srun: 8 tasks on each of 8 nodes, each task's torch.distributed variables
    cmd = launch_command(["ppo", "--config", "c.yaml"], processes=8, launcher="srun", nodes=8)
    assert cmd[:4] == ["srun", "--nodes=8", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert cmd[cmd.index("rank") + 1 :][-4:] == ["rlhf_engine.cli", "ppo", "--config", "c.yaml"]
    seen = set()
    for node in range(8):
        for local in range(8):
            task = {
                "SLURM_PROCID": str(node * 8 + local),
                "SLURM_LOCALID": str(local),
                "SLURM_NTASKS": "64",
                "SLURM_NTASKS_PER_NODE": "8",
            }
            got = subprocess.run(
                ["bash", "-c", SRUN_RANK_ENV, "rank", "bash", "-c", "echo $RANK $LOCAL_RANK $WORLD_SIZE"],
                env={"PATH": os.environ["PATH"], **task},
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            assert got == [str(node * 8 + local), str(local), "64"]
            seen.add(int(got[0]))
    assert seen == set(range(64))


# ---------------------------------------------------------------------------- jobs through Slurm


SFT = {
    "model": "tiny-opt-xs",
    "preset": "tiny",
    "config": {"sft": {"max_steps": 60, "checkpoint_interval": 10, "eval_max_rows": 16}},
}

LONG_SFT = SFT | {"config": {"sft": {"max_steps": 300, "checkpoint_interval": 25, "eval_max_rows": 16}}}


@pytest.mark.timeout(600)
def test_three_steps_through_slurm_survive_a_scancel(
    slurm_stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]], cluster: slurm.Cluster
) -> None:
    """A 3-step job runs each step as an sbatch job; `scancel` of its first step's job mid-training is
    the scheduler ending it, not the step failing: the step is submitted again, resumes from its
    checkpoint, and the job succeeds with one row per logged step."""
    case_workers(slurm_stack)
    body = {
        "model": "tiny-opt-xs",
        "reward_model": "tiny-opt-xs",
        "preset": "tiny",
        "config": {
            "sft": {"max_steps": 300, "checkpoint_interval": 25, "eval_max_rows": 16},
            "reward": {"max_steps": 20},
            "ppo": {"max_steps": 4, "checkpoint_interval": 2},
        },
    }
    with slurm_stack.client(slurm_stack.key("slurm-a")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        assert job["status"] == "queued", job
        _wait_for_step(slurm_stack, job["id"], 30)
        sft_dir = _step_dir(slurm_stack, job["id"], "step1_sft")
        first = _slurm_job(sft_dir)
        cluster.run("scancel", first["job"])
        done = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=540)
        assert done["status"] == "succeeded", done
        log = events(c, job["id"])
    msgs = [e["message"] for e in log]
    submitted = [m for m in msgs if "submitted as slurm job" in m]
    assert len(submitted) == 4, msgs  # step 1 twice, steps 2 and 3 once
    assert any("was cancelled (scancel)" in m for m in msgs), msgs
    assert _slurm_job(sft_dir)["job"] != first["job"]
    assert "JobState=CANCELLED" in cluster.run("scontrol", "show", "job", "-o", first["job"])
    rows = _metric_rows(slurm_stack, job["id"])
    assert len(rows) == len(set(rows)), "a logged step was recorded twice"
    assert {step for step, _ in rows} == {1, 2, 3}
    sft_steps = sorted(g for step, g in rows if step == 1)
    assert sft_steps[-1] == 300


@pytest.mark.timeout(600)
def test_a_step_longer_than_the_partition_allows_runs_as_a_chain_of_jobs(
    slurm_stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]], cluster: slurm.Cluster
) -> None:
    """A step whose time limit (factor × estimate; here a 5,000-minute floor) passes the partition's MaxTime
    (2 days) is submitted with the partition's limit — not left pending for ever (PartitionTimeLimit).
    Each time Slurm signals it before that limit (SIGTERM to the batch shell, what `--signal=B:TERM`
    sends; sent here by hand — no test waits two days) it checkpoints, and the worker submits it again
    without using one of its restarts, as the attempt made progress: three such stops with
    RLHF_STEP_RESTARTS=1 and the job succeeds, each logged step recorded once."""
    case_workers(slurm_stack, RLHF_STEP_MIN_TIME_MIN="5000", RLHF_STEP_RESTARTS="1")
    with slurm_stack.client(slurm_stack.key("slurm-chain")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=LONG_SFT).json()
        step_dir = _step_dir(slurm_stack, job["id"], "step1_sft")
        stopped = []
        for at in (30, 80, 130):
            _wait_for_step(slurm_stack, job["id"], at)
            current = _slurm_job(step_dir)["job"]
            shown = cluster.run("scontrol", "show", "job", "-o", current)
            assert "TimeLimit=2-00:00:00" in shown, shown
            cluster.run("scancel", "--signal=TERM", "--batch", current)
            stopped.append(current)
            deadline = time.monotonic() + 120
            while _slurm_job(step_dir)["job"] == current:  # until the worker submits the next link
                assert time.monotonic() < deadline, f"slurm job {current} was not followed by another"
                time.sleep(0.2)
        done = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=480)
        assert done["status"] == "succeeded", done
        msgs = [e["message"] for e in events(c, job["id"])]
    chained = [m for m in msgs if "(it made progress: not one of the 1 restarts)" in m]
    assert len(chained) == 3, msgs
    assert all("was stopped by Slurm's signal and checkpointed" in m for m in chained), chained
    assert not [m for m in msgs if "from its last checkpoint (" in m], msgs  # no restart used
    for job_id in stopped:  # each link ended by its own exit, stopped (75), not cancelled
        assert "ExitCode=75:0" in cluster.run("scontrol", "show", "job", "-o", job_id)
    rows = _metric_rows(slurm_stack, job["id"])
    assert len(rows) == len(set(rows)), "a logged step was recorded twice"
    assert max(g for _, g in rows) == 300


def test_slurm_time_formats_and_the_partitions_limit(cluster: slurm.Cluster, tmp_path: Path) -> None:
    """Slurm's MaxTime formats in minutes; the fixture's partition says 2 days; `--time` never asks for
    more than the partition gives."""
    cases = {"30": 30, "30:59": 30, "2:00:00": 120, "1-0": 1440, "1-02:30": 1590, "2-00:00:00": 2880}
    assert {k: launchers.slurm_minutes(k) for k in cases} == cases
    assert launchers.slurm_minutes("UNLIMITED") is None and launchers.slurm_minutes("INFINITE") is None
    assert launchers.partition_max_minutes("") == 2880  # the default partition
    assert launchers.partition_max_minutes(slurm.PARTITION) == 2880
    settings = Settings(data_dir=tmp_path, step_time_factor=3, step_min_time_min=30)
    assert launchers.time_limit(36_000, settings, 2880) == "1-06:00:00"  # 3 × 10 h fits
    assert launchers.time_limit(360_000, settings, 2880) == "2-00:00:00"  # 3 × 100 h does not


@pytest.mark.timeout(600)
def test_a_killed_worker_leaves_one_trainer(
    slurm_stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]], cluster: slurm.Cluster
) -> None:
    """kill -9 of the worker's whole group while its step trains under Slurm: the step lives on (it is the
    scheduler's), the next worker's attempt cancels it before submitting its own, and the job succeeds
    with never two trainers on the folder."""
    worker = case_workers(slurm_stack)
    with slurm_stack.client(slurm_stack.key("slurm-b")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=LONG_SFT).json()
        _wait_for_step(slurm_stack, job["id"], 30)
        step_dir = _step_dir(slurm_stack, job["id"], "step1_sft")
        count = TrainerCount(str(step_dir.parent))
        first = _slurm_job(step_dir)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        case_workers(slurm_stack)  # its sweeper finds the job once the dead worker's lease runs out
        done = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=480)
        most = count.close()
        assert done["status"] == "succeeded", done
    assert most == 1, count.seen
    second = _slurm_job(step_dir)
    assert second["attempt"] > first["attempt"] and second["job"] != first["job"]
    state = cluster.run("scontrol", "show", "job", "-o", first["job"])
    assert "JobState=CANCELLED" in state or "ExitCode=76" in state, (
        state
    )  # cancelled, or stopped by the fence
    rows = _metric_rows(slurm_stack, job["id"])
    assert len(rows) == len(set(rows))
    assert max(g for _, g in rows) == 300


@pytest.mark.timeout(600)
def test_two_ranks_under_slurm(
    slurm_stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]], cluster: slurm.Cluster
) -> None:
    """A ZeRO-2 step over 2 processes: one sbatch job, two srun tasks (ranks 0 and 1 of world size 2)."""
    case_workers(slurm_stack)
    body = SFT | {
        "num_gpus": 2,
        "config": {"sft": {"max_steps": 8, "zero_stage": 2, "checkpoint_interval": 4, "eval_max_rows": 16}},
    }
    with slurm_stack.client(slurm_stack.key("slurm-c")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        assert job["status"] == "queued", job
        done = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=480)
        assert done["status"] == "succeeded", done
        assert done["nodes"] == 1 and done["gpus_per_node"] == 2
    step_dir = _step_dir(slurm_stack, job["id"], "step1_sft")
    script = (step_dir.parent / "slurm" / "step1-attempt1.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--launcher srun" in script
    summary = json.loads((step_dir / "summary.json").read_text())
    assert summary["processes"] == 2, summary
    info = cluster.run("scontrol", "show", "job", "-o", _slurm_job(step_dir)["job"])
    assert "NumTasks=2" in info and "JobState=COMPLETED" in info, info


@pytest.mark.timeout(600)
def test_two_nodes_one_rank_each(
    slurm_stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]], cluster: slurm.Cluster
) -> None:
    """`nodes: 2` on a Slurm-backed server (the docs' walkthrough): a ZeRO-3 SFT step as one sbatch job
    over both nodes, one srun task (rank) on each, rendezvous at the first node's address."""
    case_workers(slurm_stack)
    body = SFT | {"nodes": 2, "config": {"sft": {"max_steps": 8, "zero_stage": 3, "eval_max_rows": 16}}}
    with slurm_stack.client(slurm_stack.key("slurm-f")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        assert job["status"] == "queued" and job["nodes"] == 2 and job["num_gpus"] == 2, job
        done = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=480)
        assert done["status"] == "succeeded", done
        log = events(c, job["id"])
    assert any("(2 node(s) × 1)" in e["message"] for e in log), [e["message"] for e in log]
    step_dir = _step_dir(slurm_stack, job["id"], "step1_sft")
    info = cluster.run("scontrol", "show", "job", "-o", _slurm_job(step_dir)["job"])
    assert "NumNodes=2" in info and "NodeList=node[1-2]" in info and "JobState=COMPLETED" in info, info
    summary = json.loads((step_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and (step_dir / "model.safetensors").is_file(), summary


@pytest.mark.timeout(600)
def test_a_step_waiting_in_the_queue_says_so_and_costs_nothing(
    slurm_stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]], cluster: slurm.Cluster
) -> None:
    """Both nodes held by another user's job: the step waits in Slurm's queue, the job's phase says why,
    no cost accrues and no stall bound runs; once the nodes free up it trains and succeeds."""
    blocker = cluster.run(
        "sbatch",
        "--parsable",
        "--nodes=2",
        "--exclusive",
        "--job-name=someone-else",
        "--output=/dev/null",  # not slurm-<id>.out in the working directory
        "--wrap",
        "sleep 600",
    ).strip()
    assert blocker.isdigit(), blocker
    try:
        case_workers(slurm_stack)
        with slurm_stack.client(slurm_stack.key("slurm-g")) as c:
            job = c.post("/v1/fine_tuning/jobs", json=SFT).json()
            deadline = time.monotonic() + 240
            while True:  # bounded: the deadline
                seen = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                phase = seen.get("phase") or {}
                if phase.get("name") == "scheduled":
                    break
                assert time.monotonic() < deadline, seen
                time.sleep(0.5)
            assert "waiting in the Slurm queue" in phase["description"], phase
            time.sleep(5)  # a few cost intervals (2 s each) while it waits
            waiting = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            assert waiting["status"] == "running" and waiting["cost"]["accrued_usd"] == 0, waiting["cost"]
            assert waiting["cost"]["gpu_seconds"] == 0
            cluster.run("scancel", blocker)
            done = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=300)
        assert done["status"] == "succeeded", done
        assert done["cost"]["gpu_seconds"] > 0
    finally:
        cluster.run("scancel", blocker)


@pytest.mark.timeout(300)
def test_a_refused_sbatch_fails_the_step_with_its_message(
    slurm_stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """A partition the cluster lacks: sbatch refuses, the job fails at once with the scheduler's words."""
    case_workers(slurm_stack, RLHF_SLURM_PARTITION="nowhere")
    with slurm_stack.client(slurm_stack.key("slurm-d")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=SFT).json()
        done = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
    assert done["status"] == "failed", done
    assert "sbatch refused the step" in done["error"]["message"], done
    assert "invalid partition" in done["error"]["message"].lower(), done


def test_nodes_are_checked_before_anything_is_submitted(
    slurm_stack: Stack, make_stack: Callable[..., Stack]
) -> None:
    """nodes / gpus_per_node against the server and the cluster: 400 naming the field; nothing stored."""
    cases = [
        ({"nodes": 5}, "nodes", "above this server's limit of 4"),
        ({"nodes": 3}, "nodes", "more than the 2 usable node(s) of Slurm partition 'debug'"),
        ({"nodes": 2, "num_gpus": 3}, "nodes", "do not split evenly"),
        ({"nodes": 2, "gpus_per_node": 2, "num_gpus": 3}, "num_gpus", "2 × 2 = 4"),
        ({"nodes": 2, "gpus_per_node": 0}, "gpus_per_node", ""),
    ]
    with slurm_stack.client(slurm_stack.key("slurm-e")) as c:
        for extra, param, words in cases:
            r = c.post("/v1/fine_tuning/jobs", json=SFT | extra)
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert err["param"] == param and words in err["message"], (extra, err)
        est = c.post("/v1/fine_tuning/jobs/estimate", json=SFT | {"nodes": 2, "gpus_per_node": 4}).json()
        assert est["nodes"] == 2 and est["num_gpus"] == 8, est
        assert c.get("/v1/fine_tuning/jobs").json()["data"] == []
    local = make_stack()  # a local-backend server: one machine per step
    with local.client(local.key("t")) as c:
        r = c.post("/v1/fine_tuning/jobs", json=SFT | {"nodes": 2})
        assert r.status_code == 400 and "RLHF_LAUNCH_BACKEND=local" in r.json()["error"]["message"], r.text
    # a server whose partition the cluster lacks refuses every job before storing or submitting it
    cluster_svc.forget()
    wrong = make_stack(launch_backend="slurm", slurm_partition="nowhere")
    with wrong.client(wrong.key("t")) as c:
        r = c.post("/v1/fine_tuning/jobs", json=SFT)
        assert r.status_code == 400, r.text
        assert (
            "partition 'nowhere'" in r.json()["error"]["message"] and "debug" in r.json()["error"]["message"]
        )
        assert c.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_controller_that_does_not_answer_is_an_outage_not_the_jobs_end(
    cluster: slurm.Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """squeue against a controller that is away (its port closed): the run is followed on, never taken
    for ended (which would fail the job while the step still trains)."""
    away = tmp_path / "slurm.conf"
    conf = cluster.conf.read_text()
    port = next(ln for ln in conf.splitlines() if ln.startswith("SlurmctldPort="))
    away.write_text(conf.replace(port, f"SlurmctldPort={slurm.free_port()}\nMessageTimeout=2"))
    monkeypatch.setenv("SLURM_CONF", str(away))
    run = object.__new__(launchers.SlurmRun)  # a run as submitted before the controller went away
    run.settings = Settings(data_dir=tmp_path, launch_backend="slurm", slurm_poll_s=0.1)
    run.job, run.label, run.state, run.reason, run.ended, run.checked = (
        "4242",
        "slurm job 4242",
        "RUNNING",
        "",
        None,
        0.0,
    )
    assert run.poll() is None
    assert run.running() and "controller does not answer" in run.reason, run.reason
