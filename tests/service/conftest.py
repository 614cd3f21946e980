"""Real components for the service tests: PostgreSQL and SQLite, Redis, live HTTP servers, Celery workers.

- `new_pg()`: a fresh PostgreSQL database per stack (dropped at the end).
- `make_stack(db)`: settings + a migrated database + a live uvicorn server on a free loopback port.
- `start_worker(settings)`: a real `rlhf worker train` process (Celery, threads pool of 1) on Redis.
Workers use short heartbeats, leases and sweeps so recovery happens in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from rlhf_engine.runtime.distributed import free_port
from service.db.models import InferenceWorker
from service.db.session import session_scope
from service.settings import Settings

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
FAST: dict[str, Any] = {
    "heartbeat_s": 1.0,
    "lease_s": 6.0,
    "sweep_s": 2.0,
    "cost_interval_s": 2.0,
    "step_grace_s": 60.0,
    "auth_cache_s": 1.0,
    "embedding_model": "tiny-opt-xs",  # the cosine grader embeds with a bundled tiny model
}
# A rate-limit window (RLHF_RATE_WINDOW_S) that no test outlives: windows end at multiples of 10^9 s since
# the epoch, the next one in 2033; a stack with it never sees its counts reset mid-test, so no test waits
# for a fresh minute. (The window arithmetic itself is tested with a manual clock, test_limits.py.)
NO_ROLLOVER_S = 10**9


@pytest.fixture(scope="session")
def new_pg() -> Iterator[Callable[[], str]]:
    """Fresh PostgreSQL databases, one per stack (a stack's sweeper must not find another stack's
    queued jobs), dropped at the end of the session."""
    import psycopg

    names: list[str] = []

    def make() -> str:
        name = f"rlhf_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    yield make
    from service.db.session import get_engine

    for engine_url in [f"postgresql+psycopg://postgres@127.0.0.1:5432/{n}" for n in names]:
        get_engine(engine_url).dispose()
    get_engine.cache_clear()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def new_redis() -> Iterator[Callable[[], str]]:
    """Redis databases of their own (1, 2, …, 15; flushed before and after), one per stack: workers of
    one stack must not take another stack's tasks. Database 0 is left alone (a developer's own)."""
    import redis

    used: list[str] = []

    def make() -> str:
        url = f"redis://127.0.0.1:6379/{1 + len(used)}"
        assert len(used) < 15, "out of Redis databases for tests (Redis has 16; 0 is left alone)"
        redis.Redis.from_url(url).flushdb()
        used.append(url)
        return url

    yield make
    for url in used:
        redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def scratch_redis(new_redis: Callable[[], str]) -> str:
    """One Redis database for tests that only count or store (no workers): flush it before use."""
    return new_redis()


@dataclass
class Stack:
    settings: Settings
    url: str
    env: dict[str, str]

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def key(self, tenant: str, *, operator: bool = False) -> str:
        from service.db.session import session_scope
        from service.services.keys import create_key

        with session_scope(self.settings.db_url) as s:
            return create_key(session=s, tenant=tenant, operator=operator)[1]


def _env(settings: Settings, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_") or k == "RLHF_CACHE_DIR"}
    env |= {
        "RLHF_DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
    }
    env |= {f"RLHF_{k.upper()}": str(getattr(settings, k)) for k in {*FAST, *(overrides or {})}}
    env["RLHF_VISIBILITY_TIMEOUT_S"] = str(settings.visibility_timeout_s)
    return env


def serve(settings: Settings) -> tuple[str, Callable[[], None]]:
    """A live uvicorn server for `settings` on a free loopback port; returns (base url, stop)."""
    import uvicorn

    from service.api.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def make_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    stops: list[Callable[[], None]] = []

    def make(database_url: str = "", redis_url: str = "", **overrides: Any) -> Stack:
        data = tmp_path_factory.mktemp("svc")
        settings = Settings(
            data_dir=data,
            database_url=database_url or f"sqlite:///{data / 'rlhf.db'}",
            redis_url=redis_url,
            **(FAST | overrides),
        )
        url, stop = serve(settings)
        stops.append(stop)
        # its training steps ask model graders' judges through this API (service/api/internal.py)
        return Stack(settings=settings, url=url, env=_env(settings, overrides) | {"RLHF_API_URL": url})

    yield make
    for stop in stops:
        stop()


@pytest.fixture(scope="session")
def start_worker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[Stack], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(stack: Stack, *, sweeper: bool = True, nice: int = 0, **env: str) -> subprocess.Popen[bytes]:
        """A training worker of `stack`; `env` adds to (or replaces) its environment (a cache folder of
        its own); `nice` lowers its priority (and its steps'), so that the test reacts at once to what
        they do."""
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        args = [sys.executable, "-m", "workers.cli", "worker", "train"] + (
            [] if sweeper else ["--no-sweeper"]
        )
        args = ["nice", "-n", str(nice), *args] if nice else args
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                args, env=stack.env | env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc.log = log  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def case_workers(
    start_worker: Callable[..., subprocess.Popen[bytes]],
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """`start_worker` for one test: every worker it started is stopped at the test's end (the next test on
    the same stack must find only its own)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(stack: Stack, **options: Any) -> subprocess.Popen[bytes]:
        started.append(start_worker(stack, **options))
        return started[-1]

    yield start
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=90)


class Workers:
    """Inference worker subprocesses on the e2e stack, with their logs."""

    def __init__(self, stack: Stack, tmp: Path) -> None:
        self.stack, self.tmp = stack, tmp
        self.procs: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, **env: str) -> int:
        log = self.tmp / f"worker-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker", "inference"],
                env=self.stack.env | env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[proc.pid] = (proc, log)
        deadline = time.monotonic() + 60
        while self.row(proc.pid) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        return proc.pid

    def row(self, pid: int) -> InferenceWorker | None:
        with session_scope(self.stack.settings.db_url) as s:
            row = s.scalar(select(InferenceWorker).where(InferenceWorker.pid == pid))
            if row is not None:
                s.expunge(row)
            return row

    def holding(self, model_id: str) -> list[int]:
        with session_scope(self.stack.settings.db_url) as s:
            return [w.pid for w in s.scalars(select(InferenceWorker)) if model_id in (w.models or [])]

    def log(self, pid: int) -> str:
        return self.procs[pid][1].read_text()

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


class EvalsWorker:
    """`rlhf worker evals` subprocesses of the stack (started, killed, restarted by the tests)."""

    def __init__(self, stack: Stack, tmp: Path) -> None:
        self.stack, self.tmp, self.procs = stack, tmp, []  # type: ignore[var-annotated]

    def start(self) -> subprocess.Popen[bytes]:
        log = self.tmp / f"evals-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker", "evals"],
                env=self.stack.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_for(
    client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 240
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s: {job}"
        time.sleep(0.5)


def wait_for_training(client: httpx.Client, job_id: str, timeout: float = 120) -> None:
    """Until the job's first training step is on record (its step is running, past model loading)."""
    deadline = time.monotonic() + timeout
    while not client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"limit": 1}).json()["data"]:
        assert time.monotonic() < deadline, f"job {job_id} did not start training within {timeout} s"
        time.sleep(0.3)


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.get(
            f"/v1/fine_tuning/jobs/{job_id}/events",
            params={"limit": 100} | ({"after": after} if after else {}),
        ).json()
        out += page["data"]
        if not page["has_more"]:
            return list(reversed(out))
        after = page["data"][-1]["id"]


SMALL_SFT: dict[str, Any] = {
    "model": "tiny-opt-xs",
    "preset": "tiny",
    "config": {"sft": {"max_steps": 40, "checkpoint_interval": 10, "eval_max_rows": 16}},
}


THREE_STEPS = {
    "model": "tiny-opt-xs",
    "reward_model": "tiny-opt-xs",
    "preset": "tiny",
    "suffix": "e2e",
    "config": {
        "sft": {"max_steps": 120},
        "reward": {"max_steps": 120},
        "ppo": {"max_steps": 12, "checkpoint_interval": 6},
    },
}


@pytest.fixture(scope="session")
def e2e_stack(
    make_stack: Callable[..., Stack],
    new_pg: Callable[[], str],
    new_redis: Callable[[], str],
    start_worker: Callable[..., Any],
) -> Stack:
    """PostgreSQL, Redis, the API server and a Celery training worker; shared by the job and serving tests."""
    s = make_stack(database_url=new_pg(), redis_url=new_redis())
    start_worker(s)
    return s


@pytest.fixture(scope="session")
def kill_stack(
    make_stack: Callable[..., Stack], new_pg: Callable[[], str], new_redis: Callable[[], str]
) -> Stack:
    """PostgreSQL, Redis and the API server for the tests that start, kill and stop their own training
    workers (one trainer, stalls, the kill drill): one Redis database for them all, each test's workers
    stopped at its end and each job ended, so no test's worker finds another's work."""
    return make_stack(database_url=new_pg(), redis_url=new_redis())


@pytest.fixture(scope="session")
def e2e_client(e2e_stack: Stack) -> Iterator[httpx.Client]:
    with e2e_stack.client(e2e_stack.key("e2e")) as c:
        yield c


@pytest.fixture(scope="session")
def e2e_finished(e2e_client: httpx.Client) -> dict[str, Any]:
    """One finished 3-step tiny job (SFT, reward model, PPO) on the e2e stack."""
    created = e2e_client.post("/v1/fine_tuning/jobs", json=THREE_STEPS).json()
    assert created["status"] == "queued", created
    job = wait_for(e2e_client, created["id"], ("succeeded", "failed", "cancelled"), timeout=280)
    assert job["status"] == "succeeded", job
    return {"created": created, "job": job}


def _walk(client: httpx.Client, url: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    """Every item of a list route, read `limit` at a time the one way every list pages: `after` = the
    previous page's `last_id`, until `has_more` is false (each page's first/last ids checked)."""
    items: list[dict[str, Any]] = []
    after: Any = None
    while True:
        page = client.get(
            url, params={"limit": limit, **params} | ({"after": after} if after is not None else {})
        )
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["object"] == "list" and len(body["data"]) <= limit
        ids = [d["id"] for d in body["data"]]
        assert (body["first_id"], body["last_id"]) == ((ids[0], ids[-1]) if ids else (None, None))
        items += body["data"]
        if not body["has_more"]:
            return items
        assert ids, "has_more with an empty page"
        after = body["last_id"]


@pytest.fixture(scope="session")
def walk() -> Callable[..., list[dict[str, Any]]]:
    return _walk


JUDGE_QUESTION = (
    "Is '{{sample.output_text}}' a good answer to {{item.question}}? Reply with a score from 0 to 10."
)


@pytest.fixture(scope="session")
def judged_job(e2e_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """OpenAI's reinforcement workflow through the official SDK with a multi grader of a chat judge (a
    score_model prompting tiny-opt-xs, served by an inference worker started here) and a python grader
    (in the sandbox): the finished job's id and its tenant's key. Shared by the judges' and the console's
    tests."""
    from openai import OpenAI

    workers = Workers(e2e_stack, tmp_path_factory.mktemp("judged-inference"))
    workers.start()
    try:
        key = e2e_stack.key("judged")
        sdk = OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=key, timeout=120, max_retries=0)
        rows = [
            {
                "messages": [{"role": "user", "content": f"Name an animal {i}."}],
                "question": f"animal {i}",
                "answer": "dog",
            }
            for i in range(8)
        ]
        f = tmp_path_factory.mktemp("judged") / "rl.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train = sdk.files.create(file=f.open("rb"), purpose="fine-tune")
        grader: Any = {
            "type": "multi",
            "name": "judged",
            "graders": {
                "judge": {
                    "type": "score_model",
                    "name": "judge",
                    "model": "tiny-opt-xs",
                    "input": [{"role": "user", "content": JUDGE_QUESTION}],
                    "range": [0, 10],
                    "sampling_params": {"temperature": 0, "max_completions_tokens": 4},
                },
                "py": {
                    "type": "python",
                    "name": "py",
                    "source": "def grade(sample, item):\n"
                    "    words = sample['output_text'].lower().split()\n"
                    "    return 1.0 if item['answer'] in words else min(len(words), 10) / 20",
                },
                "sim": {  # cosine: the trainer asks the server's embedding model through the API
                    "type": "text_similarity",
                    "name": "sim",
                    "input": "{{sample.output_text}}",
                    "reference": "{{item.answer}}",
                    "evaluation_metric": "cosine",
                },
            },
            "calculate_output": "0.05 * judge + py + 0.1 * sim",
        }
        method: Any = {
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": {"n_epochs": 1, "batch_size": 4}},
        }
        job = sdk.fine_tuning.jobs.create(model="tiny-opt-xs", training_file=train.id, method=method)
        deadline = time.monotonic() + 300
        while (job := sdk.fine_tuning.jobs.retrieve(job.id)).status not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, job.status
            time.sleep(1)
    finally:
        workers.stop()
    return {"id": job.id, "key": key}


# the compared eval: a finished job's SFT and RLHF models graded on four questions
EVAL_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
EVAL_PYTHON = (
    "def grade(sample, item):\n"
    "    words = sample['output_text'].split()\n"
    "    return 1.0 if 2 <= len(words) <= 40 else 0.0"
)
EVAL_CRITERIA: list[Any] = [
    {
        "type": "string_check",
        "name": "names it",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "ilike",
    },
    {"type": "python", "name": "a sentence", "source": EVAL_PYTHON, "pass_threshold": 1.0},
    {
        "type": "text_similarity",
        "name": "close",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": "fuzzy_match",
        "pass_threshold": 0.2,
    },
]
EVAL_ITEMS = [
    {"question": "What is a kite?", "answer": "kite"},
    {"question": "What flies in the wind?", "answer": "wind"},
    {"question": "Name an animal.", "answer": "dog"},
    {"question": "What is a dog?", "answer": "animal"},
]


@pytest.fixture(scope="session")
def compared_eval(
    e2e_stack: Stack, e2e_finished: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """OpenAI's eval workflow through the official SDK on the e2e job's SFT and RLHF models (sampled now
    through an inference worker, graded on an evals worker, both started here): the eval's id, each
    model's run id, and the owner's key. Shared by the evals' and the console's tests."""
    from openai import OpenAI

    tmp = tmp_path_factory.mktemp("compared-eval")
    workers, evals = Workers(e2e_stack, tmp), EvalsWorker(e2e_stack, tmp)
    workers.start()
    evals.start()
    try:
        key = e2e_stack.key("e2e")  # the tenant that owns the job's models
        sdk = OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=key, timeout=120, max_retries=0)
        config: Any = {"type": "custom", "item_schema": EVAL_SCHEMA, "include_sample_schema": True}
        ev = sdk.evals.create(
            name="kites", data_source_config=config, testing_criteria=EVAL_CRITERIA, metadata={"team": "rlhf"}
        )
        model = e2e_finished["job"]["fine_tuned_model"]
        runs = {}
        for which in (f"{model}:sft", model):
            source: Any = {
                "type": "completions",
                "model": which,
                "input_messages": {
                    "type": "template",
                    "template": [{"role": "user", "content": "{{item.question}}"}],
                },
                "sampling_params": {"temperature": 0, "max_completion_tokens": 12, "seed": 3},
                "source": {"type": "file_content", "content": [{"item": i} for i in EVAL_ITEMS]},
            }
            run = sdk.evals.runs.create(ev.id, name=which, data_source=source)
            assert run.status == "queued"
            runs[which] = run.id
        deadline = time.monotonic() + 240
        for run_id in runs.values():
            while sdk.evals.runs.retrieve(run_id, eval_id=ev.id).status in ("queued", "in_progress"):
                assert time.monotonic() < deadline
                time.sleep(0.5)
    finally:
        evals.stop()
        workers.stop()
    return {"eval_id": ev.id, "runs": runs, "key": key}
