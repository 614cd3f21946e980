"""The Celery worker app: the service's Celery configuration plus the task code.

    rlhf worker train     one job at a time (threads pool of 1, prefetch 1, acks late), plus the sweeper
    rlhf worker evals     eval runs (threads pool of 2), plus their sweeper

SIGTERM (Celery's warm shutdown) sets `training.SHUTDOWN`: the running step checkpoints, the job is
queued again, and the task returns before the process exits.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from celery.signals import worker_shutting_down

from service.db.migrate import migrate
from service.queue import EVAL_QUEUE, EVAL_TASK, TRAIN_QUEUE, TRAIN_TASK, make_celery
from service.settings import get_settings
from workers import training

logger = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)


@app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_job(self: Any, job_id: str) -> str:
    return training.train_job(job_id, settings)


@app.task(name=EVAL_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def eval_run(self: Any, run_id: str) -> str:
    from workers import evals

    return evals.run_eval(run_id, settings)


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    training.SHUTDOWN.set()


def _consume(queue: str, concurrency: int, name: str, loglevel: str) -> None:
    """This process as a Celery worker of `queue` (threads pool; no gossip, mingle or heartbeat: the
    database is the record)."""
    app.worker_main(
        [
            "worker",
            "-Q",
            queue,
            "-c",
            str(concurrency),
            "-P",
            "threads",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"{name}@{socket.gethostname()}",
            "--loglevel",
            loglevel,
        ]
    )


def run_training_worker(*, concurrency: int = 1, sweeper: bool = True, loglevel: str = "INFO") -> None:
    migrate(settings.db_url, timeout_s=settings.migrate_timeout_s)
    if settings.prebuild_ops:  # before the first job: none of them waits for a build
        training.prebuild_ops(settings)
    logger.info("training worker %s ready: taking jobs from queue %s", training.WORKER_ID, TRAIN_QUEUE)
    stop = threading.Event()
    if sweeper:
        threading.Thread(
            target=training.sweeper_loop, args=(settings, stop), name="sweeper", daemon=True
        ).start()
    try:
        _consume(TRAIN_QUEUE, concurrency, f"train-{training.WORKER_ID}", loglevel)
    finally:
        stop.set()


def run_evals_worker(*, concurrency: int = 2, loglevel: str = "INFO") -> None:
    """`rlhf worker evals`: eval runs from their own queue (a training job never holds one up), plus the
    sweeper that sends again the runs whose worker died."""
    from workers import evals

    migrate(settings.db_url, timeout_s=settings.migrate_timeout_s)
    logger.info("evals worker %s ready: taking runs from queue %s", evals.WORKER_ID, EVAL_QUEUE)
    stop = threading.Event()
    threading.Thread(
        target=evals.sweeper_loop, args=(settings, stop), name="eval-sweeper", daemon=True
    ).start()
    try:
        _consume(EVAL_QUEUE, concurrency, f"evals-{evals.WORKER_ID}", loglevel)
    finally:
        stop.set()
