"""`rlhf demo`: the service end to end on one machine, as a client sees it.

Starts `rlhf serve --all-in-one` (SQLite, a Celery worker on the filesystem transport: nothing else
needed), creates an API key, asks for an estimate, submits a 3-step RLHF job on the bundled tiny
models over HTTP, follows its events over SSE with a progress line, prints the fine-tuned model's id,
evaluates the SFT and RLHF models against the reward model (`rlhf eval`), and ends by chatting with
the new model through the streaming endpoint (`POST /v1/chat/completions`, `stream: true`), as a GUI
would. `--run-link` points a symlink at the job's run directory for `rlhf eval` / `rlhf chat`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from workers.local import create_key, start_all_in_one, stop_server, wait_healthy

JOB = {"model": "tiny-opt-s", "reward_model": "tiny-opt-xs", "preset": "tiny", "suffix": "demo", "seed": 1234}
# `--model smollm2`: the real checkpoint (LoRA) with the small reward model on its tokenizer; both are
# built by the server on first use (≈ 20 s and ≈ 190 s on 2 cores), then cached
JOBS = {
    "tiny": JOB,
    "smollm2": {
        "model": "smollm2-135m-instruct",
        "reward_model": "smollm2-rm-xs",
        "preset": "smollm2",
        "suffix": "demo",
        "seed": 1234,
    },
}
TURNS = ["What is a kite?", "And where does the owl live?"]


def run_demo(data_dir: Path, run_link: Path | None, timeout_s: float = 1800, model: str = "tiny") -> int:
    import httpx
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["RLHF_DATA_DIR"] = str(data_dir.resolve())
    server, base = start_all_in_one(data_dir, env)
    try:
        if not wait_healthy(base, server, timeout_s=120):
            console.print(f"[red]the server did not start; see {data_dir / 'server.log'}[/red]")
            return 1
        key = create_key(env, "demo", "make demo")
        console.print(f"[bold]rlhf serve --all-in-one[/bold] on {base} (database and queue in {data_dir})")
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        job_body = JOBS[model]
        est = client.post("/v1/fine_tuning/jobs/estimate", json=job_body).json()
        console.print(
            f"POST /v1/fine_tuning/jobs/estimate → {est['seconds'] / 60:.1f} min, ${est['usd']:.5f} on "
            f"{est['num_gpus']}× {est['gpu_type']}"
        )
        resp = client.post("/v1/fine_tuning/jobs", json=job_body)
        if resp.status_code != 200:
            console.print(f"[red]{resp.json()['error']['message']}[/red]")
            return 1
        job = resp.json()
        console.print(
            f"POST /v1/fine_tuning/jobs → {job['id']} ({job['status']}): steps {job['steps']}, "
            f"{job['model']} + reward model {job['reward_model']}"
        )
        started = time.monotonic()
        seen_metric: int | None = None
        with client.stream(
            "GET",
            f"/v1/fine_tuning/jobs/{job['id']}/events",
            params={"stream": "true"},
            timeout=httpx.Timeout(60, read=timeout_s),
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith(
                    ":"
                ):  # the stream's keep-alive (every 15 s): how far training got meanwhile
                    seen_metric = _show_progress(console, client, job["id"], started, seen_metric)
                    continue
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                e = json.loads(line[6:])
                kind = e["data"].get("event_type")
                if e.get("type") == "metrics" or kind == "checkpoint_saved":  # progress is shown on its own
                    continue
                step = e["data"].get("step")
                now = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                console.print(
                    f"  {time.monotonic() - started:6.1f}s  {100 * now['progress']:5.1f}%  "
                    f"{'step ' + str(step) if step else '      '}  {e['message']}",
                    markup=False,
                )
        final: dict[str, Any] = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        if final["status"] != "succeeded":
            console.print(f"[red]job {final['status']}: {final.get('error')}[/red]")
            return 1
        cost = final["cost"]
        console.print(
            f"\n[bold]{final['status']}[/bold] in {time.monotonic() - started:.0f} s; accrued "
            f"${cost['accrued_usd']:.5f} (estimated ${cost['estimated_usd']:.5f}), "
            f"{final['trained_tokens']} tokens"
        )
        console.print(f"[bold]Fine-tuned model:[/bold] {final['fine_tuned_model']}")
        ids = [m["id"] for m in client.get("/v1/models").json()["data"] if m["id"].startswith("ft:")]
        console.print(f"GET /v1/models → {', '.join(ids)}")
        from service.db.models import Job
        from service.db.session import session_scope
        from service.settings import Settings

        with session_scope(Settings(data_dir=data_dir.resolve()).db_url) as s:
            out = Path(s.get(Job, job["id"]).output_dir)  # type: ignore[union-attr]
        if run_link is not None:
            if run_link.is_symlink() or run_link.exists():
                run_link.unlink()
            run_link.parent.mkdir(parents=True, exist_ok=True)
            run_link.symlink_to(out)
            console.print(f"run directory: {out} (linked as {run_link})")
        for name, model_dir in (
            ("SFT model (step 1)", out / "step1_sft"),
            ("RLHF model (step 3)", out / "step3_rlhf" / "actor"),
        ):
            console.print(f"\n[bold]rlhf eval[/bold] — {name} against the reward model:")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "rlhf_engine.cli",
                    "eval",
                    "--model",
                    str(model_dir),
                    "--reference",
                    str(out / "step1_sft"),
                    "--reward-model",
                    str(out / "step2_reward"),
                ],
                env=env,
                check=True,
                timeout=600,
            )
        return chat(console, client, final["fine_tuned_model"])
    finally:
        stop_server(server)


def _show_progress(console: Any, client: Any, job_id: str, started: float, after: int | None) -> int | None:
    """One line with the job's progress and its newest training metrics, when there are new ones."""
    now = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    page = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/metrics",
        params={"limit": 10_000} | ({"after": after} if after is not None else {}),
    ).json()
    if not page[
        "data"
    ]:  # no training step since: say what it does instead ("building DeepSpeed ops: 38 s, …")
        if phase := now.get("phase"):
            console.print(
                f"  {time.monotonic() - started:6.1f}s  {100 * now['progress']:5.1f}%  "
                f"{'step ' + str(phase['step']) if phase.get('step') else '      '}  {phase['description']}",
                markup=False,
            )
        return after
    point = page["data"][-1]
    values = point["values"]
    shown = "  ".join(
        f"{label} {values[key]:.4g}"
        for key, label in (
            ("loss", "loss"),
            ("reward_mean", "reward"),
            ("kl_to_ref", "KL"),
            ("samples_per_s", "samples/s"),
        )
        if isinstance(values.get(key), int | float)
    )
    console.print(
        f"  {time.monotonic() - started:6.1f}s  {100 * now['progress']:5.1f}%  step {point['step']}  "
        f"training: step {point['global_step']}  {shown}",
        markup=False,
    )
    return int(page["last_id"])


def chat(console: Any, client: Any, model: str) -> int:
    """Talk to the model through the streaming endpoint, printing text as it arrives."""
    console.print(f"\n[bold]POST /v1/chat/completions[/bold] (stream: true) with {model}:")
    messages: list[dict[str, str]] = []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        console.print(f"[bold]you:[/bold] {turn}")
        console.print("[bold]model:[/bold] ", end="")
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": 40,
            "temperature": 0.7,
            "seed": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent, first, reply, usage, reward, error = time.monotonic(), None, [], None, None, None
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                console.print(f"[red]{r.json()['error']['message']}[/red]")
                return 1
            event = "message"
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                data = json.loads(line[5:])
                if event == "error":
                    error = data["error"]["message"]
                    continue
                usage = data.get("usage") or usage
                for choice in data["choices"]:
                    text = choice["delta"].get("content") or ""
                    if text and first is None:
                        first = time.monotonic()
                    reply.append(text)
                    reward = choice.get("reward", reward)
                    console.print(text, end="", markup=False)
        if error:
            console.print(f"\n[red]stream error: {error}[/red]")
            return 1
        messages.append({"role": "assistant", "content": "".join(reply)})
        took = time.monotonic() - sent
        loaded = (
            " (the inference worker loaded the model for this first request)" if len(messages) == 2 else ""
        )
        detail = (
            f"first token {1000 * ((first or sent) - sent):.0f} ms{loaded}, "
            f"{usage['completion_tokens']} tokens in {took:.2f} s"
            if usage
            else ""
        )
        console.print(f"\n[dim]  ({detail}{f', reward {reward:+.2f}' if reward is not None else ''})[/dim]")
    return 0
