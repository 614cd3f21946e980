"""The kill drill, phase by phase: the training worker's whole process group is SIGKILLed (a node
dying) while the job's step is in a given phase — the step's own phase report is the cue, not a
timer — and a new worker is started. Then the inference worker, killed while it loads a model.

Each training case runs a one-step job (SFT on the bundled tiny model: every phase a step has) and
requires: the job succeeds with no human action; at most one checkpoint interval of work is redone;
never two trainers at once; each metric point exactly once, in the run folder and the database; cost
rows unique per attempt; no phase of any attempt longer than its bound (and no stall). A kill while
DeepSpeed's op is built (a fresh build folder) must be followed by a finished step within the build
time plus a minute — the case that once left a job waiting for ever on the killed build's lock.

`make test` runs the phases in SHORT once; `make chaos` runs every phase with three seeds
(RLHF_CHAOS_PHASES=all RLHF_CHAOS_SEEDS=3) and writes the report (per phase: where the kill landed,
time lost, work redone, attempts) to bench/results/chaos-drill-<time>.json.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import random
import select as selectors
import signal
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import select

from rlhf_engine.stages import phase
from rlhf_engine.stages.records import read_jsonl
from service.db.models import CostInterval, InferenceWorker, Job, JobMetric
from service.db.session import session_scope
from tests.service.conftest import Stack, Workers, events, wait_for
from tests.service.test_one_trainer import TrainerCount, trainers

ROOT = Path(__file__).resolve().parents[2]
PHASES = (
    "preparing_model",  # the worker's, before the step: a bundled base model built on first use
    "building_ops",
    "tokenizing",
    "loading_model",
    "evaluating",
    "training",
    "saving_checkpoint",
    "restoring_checkpoint",
    "saving_model",
)
SHORT = ("building_ops", "restoring_checkpoint")
_asked = os.environ.get("RLHF_CHAOS_PHASES", "")
DRILL = PHASES if _asked == "all" else tuple(p for p in _asked.split(",") if p) or SHORT
STEP_PHASES = tuple(p for p in DRILL if p != "preparing_model")
SEEDS = int(os.environ.get("RLHF_CHAOS_SEEDS", "1"))
STEPS, INTERVAL = 60, 10
BODY = {
    "model": "tiny-opt-xs",
    "preset": "tiny",
    "config": {
        "sft": {
            "max_steps": STEPS,
            "checkpoint_interval": INTERVAL,
            "keep_checkpoints": 2,
            "eval_interval": 20,
            "eval_max_rows": 256,
        }
    },
}
REPORT: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def stack(kill_stack: Stack) -> Iterator[Stack]:
    yield kill_stack
    if REPORT:
        lines = [
            f"{r['phase']:>20} seed {r['seed']}: landed {r['landed']}, lost {r['lost_s']:.1f} s, redone "
            f"{r['redone_steps']} steps, attempts {r['attempts']}, "
            f"kill to finished step {r['kill_to_finish_s']:.1f} s"
            for r in REPORT
        ]
        print("\nkill drill:\n" + "\n".join(lines))
        if os.environ.get("RLHF_CHAOS_REPORT"):
            out = ROOT / "bench" / "results" / f"chaos-drill-{time.strftime('%Y%m%d-%H%M%S')}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"cases": REPORT}, indent=1) + "\n")
            print(f"report: {out}")


@pytest.fixture
def new_worker(
    stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]]
) -> Callable[..., subprocess.Popen[bytes]]:
    # the worker and its steps below the test's priority: the test freezes a step within a millisecond of
    # its phase report, even while the step keeps both cores busy (a checkpoint takes 15 ms)
    return functools.partial(case_workers, stack, nice=10)


class Cue:
    """The step's phase reports as they are written (inotify on the step folder: each report is a rename
    into place), so that a cue is acted on within a millisecond — a checkpoint of the tiny model is
    written in 15 ms."""

    IN_MOVED_TO = 0x80

    def __init__(self, step_dir: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        step_dir.mkdir(parents=True, exist_ok=True)  # the worker creates it too (exist_ok): watch it first
        self.dir, self.fd = step_dir, libc.inotify_init1(os.O_CLOEXEC)
        assert self.fd >= 0 and libc.inotify_add_watch(self.fd, str(step_dir).encode(), self.IN_MOVED_TO) >= 0

    def wait(self, target: str, *, at: int, after: float, deadline: float) -> dict[str, Any]:
        """The report once the step is in `target` (at global step `at` or later), from a process started
        after `after`."""
        last = None
        while time.monotonic() < deadline:
            state = phase.read(self.dir)
            ours = state and state.get("process_started", 0) >= after and state["phase"] == target
            if ours and (state.get("global_step") or 0) >= at:  # type: ignore[union-attr]
                return state  # type: ignore[return-value]
            last = state or last
            if selectors.select([self.fd], [], [], 0.5)[0]:
                os.read(self.fd, 65536)
        raise AssertionError(f"the step never reported {target} at step {at}+ (last report: {last})")

    def close(self) -> None:
        os.close(self.fd)


def _kill(worker: subprocess.Popen[bytes], out: Path, step_pid: int | None = None) -> float:
    """SIGKILL the worker's whole group while the step stands still in its phase (SIGSTOP, then SIGCONT
    once the worker is dead: to the step, its worker died at that instant); then the orphaned step (its
    own session) notices and leaves."""
    if step_pid:
        os.kill(step_pid, signal.SIGSTOP)  # (again, if the caller stopped it already: harmless)
    killed = time.time()
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    if step_pid:
        os.kill(step_pid, signal.SIGCONT)
    deadline = time.monotonic() + 90  # its grace (step_grace_s) and a margin
    while trainers(str(out)):
        assert time.monotonic() < deadline, "the orphaned step is still running"
        time.sleep(0.1)
    return killed


def _landed(step_dir: Path, state: dict[str, Any], killed: float) -> bool:
    """Whether the step was still in the cue's phase when its worker died (the phase ended later, or
    never: the step died in it)."""
    for line in phase.history(step_dir):
        if line["pid"] == state["pid"] and abs(line["started"] - state["since"]) < 1e-3:
            return bool(line["started"] + line["seconds"] >= killed)
    return True


def _next_attempt(step_dir: Path, after: float) -> dict[str, Any] | None:
    """The `step_started` event of the first attempt after `after` (None: the orphan finished the step)."""
    for e in read_jsonl(step_dir / "events.jsonl"):
        if e["type"] == "step_started" and e["time"] > after:
            return e
    return None


def _lost(step_dir: Path, pid: int, killed: float, target: str) -> tuple[int, float]:
    """(steps redone, seconds lost) by the kill. The orphan of the killed worker keeps going until its next
    step boundary (or ends at once before training); from where it stopped, the next attempt resumes at
    its checkpoint. Seconds lost: from the orphan's last progress until the next attempt got past it (a
    metric point past the orphan's last; before any training, the same phase entered again)."""
    mine = [line for line in phase.history(step_dir) if line["pid"] == pid]
    stopped = max([killed] + [line["started"] + line["seconds"] for line in mine])
    reach = max([0] + [line["global_step"] + line.get("steps", 0) for line in mine if line["global_step"]])
    nxt = _next_attempt(step_dir, killed)
    if nxt is None:
        return 0, 0.0
    resumed = int(nxt["data"].get("global_step") or 0) if "resuming at step" in nxt["message"] else 0
    finished = (step_dir / "summary.json").stat().st_mtime
    if reach:
        passed = (m["time"] for m in read_jsonl(step_dir / "metrics.jsonl") if m["step"] > reach)
    else:
        passed = (
            line["started"]
            for line in phase.history(step_dir)
            if line["started"] > stopped and line["phase"] == target
        )
    return max(0, reach - resumed), max(0.0, float(next(passed, finished)) - stopped)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("target", "seed"), [(p, s) for p in STEP_PHASES for s in range(SEEDS)])
def test_a_node_dies_in_every_phase(
    target: str, seed: int, stack: Stack, new_worker: Callable[..., Any], tmp_path: Path
) -> None:
    rng = random.Random(zlib.crc32(target.encode()) + seed)
    env = {"RLHF_PREBUILD_OPS": "false"}  # the step itself builds what it lacks
    if target == "building_ops":  # a fresh build folder: the step compiles DeepSpeed's op (tens of seconds)
        env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    if target == "tokenizing":  # a fresh cache: the step tokenises its data
        env["RLHF_CACHE_DIR"] = str(tmp_path / "cache")
    at = {
        "training": rng.randint(12, 50),
        "saving_checkpoint": INTERVAL * rng.randint(1, 4),
        "evaluating": rng.choice([0, 20, 40, 60]),
    }.get(target, 0)
    worker = new_worker(**env)
    case_started = time.time()
    with stack.client(stack.key(f"drill-{target}-{seed}")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=BODY).json()
        with session_scope(stack.settings.db_url) as s:
            out = Path(s.get(Job, job["id"]).output_dir)  # type: ignore[union-attr]
        step_dir = out / "step1_sft"
        count = TrainerCount(str(out))
        cue = Cue(step_dir)
        deadline = time.monotonic() + 240
        if target == "restoring_checkpoint":  # there is one only on resume: a first kill mid-training
            state = cue.wait("training", at=15 + rng.randint(0, 20), after=case_started, deadline=deadline)
            first = _kill(worker, out, state["pid"])
            worker = new_worker(**env)
            case_started = first
        state = cue.wait(target, at=at, after=case_started, deadline=deadline)
        if target == "building_ops":
            time.sleep(rng.uniform(1.0, 10.0))  # somewhere inside the build (tens of seconds)
        os.kill(state["pid"], signal.SIGSTOP)  # at once: a checkpoint of the tiny model takes 15 ms
        reached = max((m["step"] for m in read_jsonl(step_dir / "metrics.jsonl")), default=0)
        killed = _kill(worker, out, state["pid"])
        cue.close()  # (closing an inotify descriptor can take tens of milliseconds: not before the kill)
        landed = _landed(step_dir, state, killed)
        # the worker died while the step was in it
        assert landed, (
            f"killed {1000 * (killed - state['since']):.0f} ms into {state['label']}",
            phase.history(step_dir),
        )
        new_worker(**env)
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=300)
        said = events(c, job["id"])
    assert done["status"] == "succeeded", done
    assert count.close() == 1, count.seen  # never two trainers at once
    redone, lost = _lost(step_dir, state["pid"], killed, target)
    assert redone <= INTERVAL, (redone, reached)  # at most one checkpoint interval
    assert [m["step"] for m in read_jsonl(step_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    with session_scope(stack.settings.db_url) as s:
        points = s.scalars(select(JobMetric.global_step).where(JobMetric.job_id == job["id"])).all()
        costs = s.scalars(select(CostInterval).where(CostInterval.job_id == job["id"])).all()
        attempts = s.get(Job, job["id"]).attempts  # type: ignore[union-attr]
    assert sorted(points) == list(range(1, STEPS + 1))
    assert len({(r.step, r.attempt, r.interval) for r in costs}) == len(costs)
    assert not [e for e in said if e["data"]["event_type"] == "step_stalled"]
    bound = stack.settings.stall_floor_s  # nothing here is slow enough for its bound to pass the floor
    longest = max(line.get("longest_s", line["seconds"]) for line in phase.history(step_dir))
    assert longest <= bound, [line for line in phase.history(step_dir) if line["seconds"] > bound]
    summary_at = (step_dir / "summary.json").stat().st_mtime
    if target == "building_ops":  # the killed build's lock did not hold the next attempt up
        built = [line["seconds"] for line in phase.history(step_dir) if line["phase"] == "building_ops"]
        assert summary_at - killed <= built[-1] + 60, (summary_at - killed, built)
        log = (
            out / "logs" / "step1_sft.log"
        ).read_text()  # the killed build left its lock; the next cleared it
        assert "removed the build lock a killed build left behind" in log, log[-3000:]
    REPORT.append(
        {
            "phase": target,
            "seed": seed,
            "landed": landed,
            "attempts": attempts,
            "redone_steps": redone,
            "lost_s": round(lost, 1),
            "cue_ms": round(1000 * (killed - state["since"]), 1),  # from the phase report to the kill
            "kill_to_finish_s": round(summary_at - killed, 1),
        }
    )


if "preparing_model" in DRILL:  # (not collected otherwise: `make test` runs the step phases only)

    @pytest.mark.slow
    @pytest.mark.timeout(600)
    @pytest.mark.parametrize("seed", range(SEEDS))
    def test_a_node_dies_while_its_worker_builds_the_base_model(
        seed: int, stack: Stack, new_worker: Callable[..., Any]
    ) -> None:
        """The worker's own phase, before any step: a bundled base model built on first use (a model not built
        on this server yet, one per seed). The build (a child that watches the worker) ends with the worker,
        its lock with it, and the next worker builds the model and runs the job."""
        model = f"tiny-{('gpt2', 'llama', 'qwen2')[seed % 3]}-xs"
        worker = new_worker()
        with stack.client(stack.key(f"drill-model-{seed}")) as c:
            job = c.post("/v1/fine_tuning/jobs", json=BODY | {"model": model}).json()
            deadline = time.monotonic() + 120
            while True:  # the job says so: preparing base model …
                with session_scope(stack.settings.db_url) as s:
                    shown = (s.get(Job, job["id"]).phase or {}).get("name")  # type: ignore[union-attr]
                if shown == "preparing_model":
                    break
                assert time.monotonic() < deadline, c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                time.sleep(0.05)
            folder = stack.settings.models_dir / model
            builders: list[psutil.Process] = []
            while not builders and not (folder / "config.json").exists():  # its builder process, once started
                assert time.monotonic() < deadline, "no builder started"
                builders = [
                    p
                    for p in psutil.process_iter(["cmdline"])
                    if "rlhf_engine.cli" in (cmd := " ".join(p.info["cmdline"] or [])) and str(folder) in cmd
                ]
            for b in builders:  # frozen where it is (a small model builds in seconds): the kill lands inside
                b.suspend()
            landed = bool(builders) and not (folder / "config.json").exists()
            killed = _kill(worker, stack.settings.runs_dir)  # the build is in the worker's group: it dies too
            deadline = time.monotonic() + 60
            while any(b.is_running() and b.status() != psutil.STATUS_ZOMBIE for b in builders):
                assert time.monotonic() < deadline, "the build outlived its worker"
                time.sleep(0.1)
            new_worker()
            done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=300)
            said = events(c, job["id"])
        assert done["status"] == "succeeded", done
        assert landed, "the build had finished before the kill"
        assert sum(e["message"].startswith(f"base model {model} ready") for e in said) == 1, said
        builds = [
            e["created_at"]
            for e in said
            if e["message"].startswith(f"preparing base model {model} (first use")
        ]
        assert len(builds) == 2, said  # the killed build, and the one that finished
        with session_scope(stack.settings.db_url) as s:
            attempts = s.get(Job, job["id"]).attempts  # type: ignore[union-attr]
        REPORT.append(
            {
                "phase": "preparing_model",
                "seed": seed,
                "landed": landed,
                "attempts": attempts,
                "redone_steps": 0,
                "lost_s": float(builds[1] - builds[0]),  # the build lost and the restart
                "kill_to_finish_s": round(done["finished_at"] - killed, 1),
            }
        )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_inference_worker_dies_while_it_loads_a_model(
    e2e_stack: Stack, e2e_finished: dict[str, Any], tmp_path: Path
) -> None:
    """Killed while loading: the request waiting for it ends with a clear error at once (no hang), and
    the next worker serves it."""
    model = e2e_finished["job"]["fine_tuned_model"]
    key = e2e_stack.key("e2e")  # the tenant that owns the fine-tuned model
    workers = Workers(e2e_stack, tmp_path)
    try:
        pid = workers.start()
        body = {"model": model, "messages": [{"role": "user", "content": "What is a kite?"}], "max_tokens": 8}
        result: dict[str, Any] = {}

        def ask() -> None:
            started = time.monotonic()
            r = httpx.post(
                f"{e2e_stack.url}/v1/chat/completions",
                json=body,
                timeout=120,
                headers={"Authorization": f"Bearer {key}"},
            )
            result.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - started)

        import threading

        asking = threading.Thread(target=ask)
        asking.start()
        deadline = time.monotonic() + 60
        while model not in (
            (workers.row(pid) or InferenceWorker()).loading or []
        ):  # its row says it is loading
            assert time.monotonic() < deadline and asking.is_alive(), result
            time.sleep(0.005)
        os.killpg(pid, signal.SIGKILL)
        asking.join(timeout=60)
        assert not asking.is_alive(), "the request hung on the dead worker"
        print(
            f"\ninference worker killed while loading: {result['status']} "
            f"{result['body']['error']['code']} after {result['seconds']:.1f} s"
        )
        assert result["status"] in (502, 503), result  # named, retryable; never a 500 or a hang
        assert result["body"]["error"]["code"] in ("worker_lost", "worker_unavailable", "no_worker"), result
        workers.start()
        deadline = time.monotonic() + 120
        while True:
            r = httpx.post(
                f"{e2e_stack.url}/v1/chat/completions",
                json=body,
                timeout=120,
                headers={"Authorization": f"Bearer {key}"},
            )
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.monotonic() < deadline, r.text  # retry after Retry-After
            time.sleep(float(r.headers.get("Retry-After", "1")))
        assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        workers.stop()
