"""The Celery app as the API sees it: configuration and enqueue-by-name, no task code (and no torch).

Broker: Redis when `REDIS_URL` is set; otherwise kombu's filesystem transport in the data directory,
so one machine needs no broker server (workers are still real Celery processes). The database is the
record: a lost message is found again by the sweeper (docs/contracts.md §7).
"""

from __future__ import annotations

import logging

from celery import Celery

from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)
TRAIN_TASK = "rlhf.train_job"
TRAIN_QUEUE = "train"
EVAL_TASK = "rlhf.eval_run"
EVAL_QUEUE = "evals"


def make_celery(settings: Settings) -> Celery:
    app = Celery("rlhf")
    conf: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": TRAIN_QUEUE,
        "task_routes": {TRAIN_TASK: {"queue": TRAIN_QUEUE}, EVAL_TASK: {"queue": EVAL_QUEUE}},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    if settings.redis_url:
        conf["broker_url"] = settings.redis_url
        conf["broker_transport_options"] = {"visibility_timeout": settings.visibility_timeout_s}
    else:
        folder = settings.queue_dir
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_url"] = "filesystem://"
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
    app.conf.update(conf)
    return app


_APPS: dict[tuple[str, str], Celery] = {}


def celery_app(settings: Settings | None = None) -> Celery:
    """One app per broker (cached: building one per request would reconnect every time)."""
    settings = settings or get_settings()
    key = (settings.redis_url, str(settings.queue_dir))
    if key not in _APPS:
        _APPS[key] = make_celery(settings)
    return _APPS[key]


def _send(task: str, queue: str, object_id: str, settings: Settings) -> bool:
    """Send a task by name; False (logged) if the broker is down: the record is in the database and a
    sweeper sends it again."""
    try:
        celery_app(settings).send_task(
            task,
            args=[object_id],
            queue=queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        )
        return True
    except Exception:  # the broker being down must not fail the request
        logger.warning("could not enqueue %s; the sweeper will", object_id, exc_info=True)
        return False


def enqueue_training(job_id: str, settings: Settings) -> bool:
    """Send the job to the training queue (the training worker's sweeper retries a lost one)."""
    return _send(TRAIN_TASK, TRAIN_QUEUE, job_id, settings)


def enqueue_eval(run_id: str, settings: Settings) -> bool:
    """Send an eval run to the evals queue (the evals worker's sweeper retries a lost one)."""
    return _send(EVAL_TASK, EVAL_QUEUE, run_id, settings)
