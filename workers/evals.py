"""Eval runs, executed: claim the run's lease, sample each pending item from the run's model (completions
runs) or take its given sample (jsonl runs), grade it with every criterion, and write one output item per
row — in batches, so a cancel is seen within one batch and a run resumed after its worker died (the
sweeper re-enqueues it when its lease runs out) grades only the items not written yet.

Models are reached only through the inference workers (service/services/chat.py), judges too
(service/services/judges.py); python criteria run in the sandbox. The asyncio side lives on one loop
in a thread of its own for the run; grading runs in the task's thread, hopping onto that loop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update

from rlhf_engine import graders
from service.db.models import EvalOutputItem, EvalRun, utcnow
from service.db.session import session_scope
from service.jobs import evals as job_evals
from service.services import embeddings, judges
from service.services import evals as evals_svc
from service.settings import Settings

logger = logging.getLogger(__name__)
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
BATCH = 8
REENQUEUE_S = 60.0  # a run the sweeper sent again is not sent again before this


def _claim(settings: Settings, run_id: str, owner: str) -> bool:
    with session_scope(settings.db_url) as s:
        return evals_svc.claim_run(session=s, run_id=run_id, owner=owner, lease_s=settings.lease_s)


def _renew(settings: Settings, run_id: str, owner: str) -> str | None:
    """Extend the lease; the run's control (cancel) or 'lost' when the lease is another's now."""
    with session_scope(settings.db_url) as s:
        run = s.get(EvalRun, run_id, populate_existing=True)
        if run is None or run.lease_owner != owner:
            return "lost"
        run.lease_until = utcnow() + timedelta(seconds=settings.lease_s)
        return run.control


async def _sample(
    settings: Settings, tenant: str, source: dict[str, Any], items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each item's sample from the run's model (OpenAI's sample shape), asked the way judges are
    (`judges.ask`: through the inference workers, concurrently)."""
    params = source["sampling_params"]
    template = source["input_messages"]
    if template["type"] == "item_reference":
        path = template["item_reference"].removeprefix("item.")
        sent = [
            [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in given]
            for given in (evals_svc.item_path(item, path) or [] for item in items)
        ]
    else:
        parsed = graders.parse_messages({"input": template["template"]}, "data_source.input_messages")
        empty = graders.Sample("")
        sent = [
            [{"role": m.role, "content": m.content.render(empty, item, "template")} for m in parsed]
            for item in items
        ]
    replies = await judges.ask(
        settings=settings, tenant=tenant, model=source["model"], prompts=sent, sampling=params
    )
    out = []
    for messages, reply in zip(sent, replies, strict=True):
        code, _, message = (reply.error or "").partition(": ")
        out.append(
            {
                "model": source["model"],
                "input": messages,
                "output": [{"role": "assistant", "content": reply.text}] if reply.text is not None else [],
                "finish_reason": reply.finish_reason,
                "usage": {
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                    "cached_tokens": 0,
                },
                "temperature": params.get("temperature") if params.get("temperature") is not None else 1.0,
                "top_p": params.get("top_p") if params.get("top_p") is not None else 1.0,
                "max_completion_tokens": params["max_completion_tokens"],
                "seed": params.get("seed") if params.get("seed") is not None else 0,
                "error": {"code": code, "message": message or code} if reply.error is not None else None,
            }
        )
    return out


def _given_sample(row: dict[str, Any]) -> dict[str, Any]:
    text = evals_svc.sample_text(row.get("sample"))
    return {
        "model": "",
        "input": [],
        "output": [{"role": "assistant", "content": text}] if text is not None else [],
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0},
        "error": None,
    }


def _grade(
    criteria: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    items: list[dict[str, Any]],
    context: graders.Context,
) -> tuple[list[list[dict[str, Any]]], dict[str, dict[str, int]]]:
    """Each item's result per criterion, and the judges' token use."""
    texts = [(s["output"][0]["content"] if s["output"] else "") for s in samples]
    results: list[list[dict[str, Any]]] = [[] for _ in items]
    usage: dict[str, dict[str, int]] = {}
    for c in criteria:
        grader = graders.parse(c)
        graded = graders.grade_batch(grader, texts, items, context)
        for i, g in enumerate(graded):
            ok = evals_svc.passes(c, g)
            results[i].append(
                {
                    "name": c["name"],
                    "type": c["type"],
                    "score": g.score,
                    "passed": ok,
                    "sample": {"errors": g.errors, "judges": g.replies} if (g.errors or g.replies) else None,
                }
            )
            for model, counts in g.usage.items():
                mine = usage.setdefault(model, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
                mine["calls"] += 1
                mine["prompt_tokens"] += counts.get("prompt_tokens", 0)
                mine["completion_tokens"] += counts.get("completion_tokens", 0)
    return results, usage


def _add_usage(total: dict[str, Any], more: dict[str, dict[str, int]]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in (total or {}).items()}
    for model, counts in more.items():
        mine = out.setdefault(model, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
        for k, v in counts.items():
            mine[k] = mine.get(k, 0) + v
    return out


def run_eval(run_id: str, settings: Settings) -> str:
    """Execute one run (or the rest of it); the run's final status. The lease is this execution's own
    (two deliveries in one process are two owners) and a heartbeat keeps it while a batch runs long."""
    owner = f"{WORKER_ID}:{uuid.uuid4().hex[:8]}"
    if not _claim(settings, run_id, owner):
        return "not claimed"  # another worker holds it, or it ended: a duplicate delivery
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"eval-{run_id}", daemon=True)
    thread.start()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(settings.heartbeat_s):
            try:
                if _renew(settings, run_id, owner) == "lost":
                    return
            except Exception:  # the database away for a moment: the next beat tries again
                logger.warning("eval run %s: lease renewal failed", run_id, exc_info=True)

    beat = threading.Thread(target=heartbeat, name=f"eval-beat-{run_id}", daemon=True)
    beat.start()
    try:
        return _execute(run_id, settings, loop, owner)
    except Exception as e:  # a bug or an environment problem: the run fails with the reason
        logger.exception("eval run %s failed", run_id)
        with session_scope(settings.db_url) as s:
            run = s.get(EvalRun, run_id)
            if run is not None and run.lease_owner == owner:
                evals_svc.end_run(
                    run, "failed", {"code": "run_failed", "message": f"{type(e).__name__}: {e}"[:2000]}
                )
        return "failed"
    finally:
        stop.set()
        beat.join(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _execute(run_id: str, settings: Settings, loop: asyncio.AbstractEventLoop, owner: str) -> str:
    with session_scope(settings.db_url) as s:
        run = s.get(EvalRun, run_id)
        assert run is not None
        ev = evals_svc.get_eval(session=s, tenant=run.tenant_id, eval_id=run.eval_id)
        criteria, tenant, source = list(ev.testing_criteria), run.tenant_id, dict(run.data_source)
        eval_name = ev.name
        rows = evals_svc.rows_of(s, run)
        done = set(s.scalars(select(EvalOutputItem.item_index).where(EvalOutputItem.run_id == run_id)))
    context = graders.Context(
        judge=judges.judge_on(loop, settings, tenant),
        limits=settings.grader_limits(),
        embed=embeddings.embedder_on(loop, settings, tenant),
    )
    pending = [i for i in range(len(rows)) if i not in done]
    for start in range(0, len(pending), BATCH):
        control = _renew(settings, run_id, owner)
        if control == "lost":
            return "lost"
        if control == "cancel":
            with session_scope(settings.db_url) as s:
                run = s.get(EvalRun, run_id, with_for_update=True)
                if run is None or run.lease_owner != owner:
                    return "lost"
                evals_svc.tally(s, run, criteria)
                evals_svc.end_run(run, "canceled")
            return "canceled"
        batch = pending[start : start + BATCH]
        items = [rows[i]["item"] for i in batch]
        if source["type"] == "completions":
            coro = _sample(settings, tenant, source, items)
            samples = asyncio.run_coroutine_threadsafe(coro, loop).result(
                timeout=settings.chat_timeout_s * 2 + 60
            )
        else:
            samples = [_given_sample(rows[i]) for i in batch]
        results, judge_usage = _grade(criteria, samples, items, context)
        sampled = (
            {
                source.get("model", ""): {
                    "calls": sum(1 for x in samples if not x["error"]),
                    "prompt_tokens": sum(x["usage"]["prompt_tokens"] for x in samples),
                    "completion_tokens": sum(x["usage"]["completion_tokens"] for x in samples),
                }
            }
            if source["type"] == "completions"
            else {}
        )
        with session_scope(settings.db_url) as s:
            run = s.get(EvalRun, run_id, with_for_update=True)
            if run is None or run.lease_owner != owner:
                return "lost"
            for i, sample, result in zip(batch, samples, results, strict=True):
                ok = sample["error"] is None and all(r["passed"] for r in result)
                s.add(
                    EvalOutputItem(
                        run_id=run_id,
                        item_index=i,
                        status="pass" if ok else "fail",
                        datasource_item=rows[i]["item"],
                        results=result,
                        sample=sample,
                    )
                )
            run.usage = _add_usage(_add_usage(run.usage, sampled), judge_usage)
            s.flush()
            evals_svc.tally(s, run, criteria)
    with session_scope(settings.db_url) as s:
        run = s.get(EvalRun, run_id, with_for_update=True)
        if run is None or run.lease_owner != owner:
            return "lost"
        evals_svc.tally(s, run, criteria)
        evals_svc.end_run(run, "completed")
        if run.job_id:
            job_evals.report_to_job(s, run, eval_name)
    return "completed"


def sweep(settings: Settings) -> list[str]:
    """Runs to enqueue again: queued ones nobody holds (their message may be lost) and running ones whose
    worker stopped renewing its lease."""
    from service.queue import enqueue_eval

    now = utcnow()
    stale = now - timedelta(seconds=max(settings.lease_s, 5.0))
    free = EvalRun.lease_owner.is_(None) & (EvalRun.lease_until.is_(None) | (EvalRun.lease_until < now))
    with session_scope(settings.db_url) as s:
        ids = list(
            s.scalars(
                select(EvalRun.id).where(
                    or_(
                        (EvalRun.status == "in_progress") & (EvalRun.lease_until < now),
                        (EvalRun.status == "queued") & free & (EvalRun.created_at < stale),
                    )
                )
            )
        )
        # the dead worker's lease released (a slow one finds it lost and stops); the next sweep of the same
        # run waits for the redelivery to be claimed (lease_until, with no owner, is that wait)
        s.execute(
            update(EvalRun)
            .where(EvalRun.id.in_(ids))
            .values(lease_owner=None, lease_until=now + timedelta(seconds=REENQUEUE_S))
        )
    for run_id in ids:
        enqueue_eval(run_id, settings)
    return ids


def sweeper_loop(settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(settings.sweep_s):
        try:
            if ids := sweep(settings):
                logger.info("eval sweeper re-enqueued %s", ", ".join(ids))
        except Exception:
            logger.exception("eval sweep failed")
