"""OpenAI's supervised workflow with a validation file on the real SmolLM2-135M-Instruct, through the service.

`rlhf serve --all-in-one` on loopback (SQLite, Celery on the filesystem: one training worker), driven
with the official openai SDK and nothing but `base_url`, `api_key` and the model name changed: upload a
training and a validation file in OpenAI's chat format (the bundled world's questions with their on-topic
answers; the two files share no question), create a supervised job with `validation_file`, follow its
`metrics` events, read its results CSV through `files.content`. Records each evaluation's validation
loss (a sample of 64 rows) and the full validation loss at the end, the resolved hyperparameters, the
wall time, and the machine probe of the same run. JSON goes to bench/results/.

    python bench/openai_port.py [--train-rows 320 --valid-rows 64 --epochs 1 --batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from step3 import machine_probe

from workers.local import create_key, start_all_in_one, stop_server, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def chat_rows(start: int, n: int) -> list[dict[str, Any]]:
    """OpenAI's chat format from the bundled preference data's questions and on-topic (chosen) answers."""
    from rlhf_engine.config.data import DataConfig
    from rlhf_engine.data.prepare import load_datasets

    rows = load_datasets(DataConfig(data=["bundled:preference"]))[0].rows[start : start + n]
    return [
        {
            "messages": [
                *[m.as_dict() for m in r.conversation],
                {"role": "assistant", "content": r.chosen.strip()},
            ]
        }
        for r in rows
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-rows", type=int, default=320)
    ap.add_argument("--valid-rows", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--timeout-s", type=float, default=3600)
    ns = ap.parse_args()
    from openai import OpenAI, omit

    probe = machine_probe()
    data = Path(tempfile.mkdtemp(prefix="openai-port-"))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"RLHF_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    server, base = start_all_in_one(data, env)
    try:
        if not wait_healthy(base, server, timeout_s=120):
            print(f"the server did not start; see {data / 'server.log'}", file=sys.stderr)
            return 1
        sdk = OpenAI(base_url=f"{base}/v1", api_key=create_key(env, "bench", "openai port"), timeout=120)
        files = {}
        for name, start, n in (("train", 0, ns.train_rows), ("valid", 2000, ns.valid_rows)):
            path = data / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(start, n)))
            files[name] = sdk.files.create(file=path.open("rb"), purpose="fine-tune").id
        started = time.monotonic()
        job = sdk.fine_tuning.jobs.create(
            model=MODEL,
            training_file=files["train"],
            validation_file=files["valid"],
            suffix="port",
            seed=1,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": ns.epochs, "batch_size": ns.batch_size}},
            },
        )
        while (job := sdk.fine_tuning.jobs.retrieve(job.id)).status not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            if time.monotonic() - started > ns.timeout_s:
                print(f"{job.id} still {job.status} after {ns.timeout_s:.0f} s", file=sys.stderr)
                return 1
            time.sleep(5)
        wall = time.monotonic() - started
        events: list[Any] = []
        after: str | None = None
        while True:
            page = sdk.fine_tuning.jobs.list_events(job.id, limit=100, after=after or omit)
            events += page.data
            if not page.has_more:
                break
            after = page.data[-1].id
        metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda m: m["step"])
        csv_text = sdk.files.content(job.result_files[0]).text if job.result_files else ""
    finally:
        stop_server(server)
    out = {
        "bench": "openai_port",
        "model": MODEL,
        "status": job.status,
        "error": job.error.message if job.error else None,
        "hyperparameters": job.hyperparameters.model_dump(),
        "train_rows": ns.train_rows,
        "valid_rows": ns.valid_rows,
        "wall_s": round(wall, 1),
        "steps": len(metrics),
        "train_loss_first": metrics[0].get("train_loss") if metrics else None,
        "train_loss_last": metrics[-1].get("train_loss") if metrics else None,
        "valid_loss_before": next(
            (
                e.data.get("loss")
                for e in events
                if e.data.get("event_type") == "eval" and e.data.get("global_step") == 0
            ),
            None,
        ),
        "valid_loss": [(m["step"], round(m["valid_loss"], 4)) for m in metrics if "valid_loss" in m],
        "full_valid_loss": metrics[-1].get("full_valid_loss") if metrics else None,
        "full_valid_mean_token_accuracy": metrics[-1].get("full_valid_mean_token_accuracy")
        if metrics
        else None,
        "results_csv_rows": max(0, len(csv_text.splitlines()) - 1),
        "machine": probe,
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"openai_port-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    print(f"→ {path}")
    return 0 if job.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
