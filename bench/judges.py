"""Model judges: grading throughput through the inference workers vs the same judge loaded in the trainer,
and the judge's share of a GRPO step — on the real SmolLM2-135M-Instruct as the judge.

    in the trainer     the judge loaded in process (a ChatGenerator: the continuous batch every engine
                       path uses), all prompts submitted at once — what a step would do if it loaded
                       the judge itself (a second copy of a served model, which the contract forbids)
    through workers    `rlhf serve --all-in-one`: concurrent `POST /v1/fine_tuning/alpha/graders/run`
                       with a label_model grader (route, worker, parse), 16 in flight — the path a
                       training step's judge requests take after the API
    GRPO step share    a reinforcement job through the same server (actor SmolLM2, 4 prompts × 4 answers
                       per step) whose grader is that judge: each step's `score_s` over its whole time

Each side runs alone on the machine (in-process before the server starts and again after it stopped:
the median of the two). Greedy judging (temperature 0), 4 reply tokens. JSON goes to bench/results/
with the machine probe of the same run.

    python bench/judges.py [--prompts 64 --steps 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from step3 import machine_probe

from workers.local import create_key, start_all_in_one, stop_server, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
JUDGE = "smollm2-135m-instruct"
TEMPLATE = (
    "Question: {{item.question}}\nAnswer: {{sample.output_text}}\n"
    "Does the answer talk about the subject of the question? Reply yes or no."
)
TOKENS = 4
GRADER = {  # the judge as a label_model grader: the same in /graders/run and in the GRPO job
    "type": "label_model",
    "name": "on_topic",
    "model": JUDGE,
    "input": [{"role": "user", "content": TEMPLATE}],
    "labels": ["yes", "no"],
    "passing_labels": ["yes"],
    "sampling_params": {"temperature": 0, "max_completions_tokens": TOKENS},
}


def workload(n: int) -> list[tuple[str, str]]:
    """(question, answer) pairs from the bundled preference data (its on-topic answers)."""
    from rlhf_engine.config.data import DataConfig
    from rlhf_engine.data.prepare import load_datasets

    rows = load_datasets(DataConfig(data=["bundled:preference"]))[0].rows[:n]
    return [(r.conversation[-1].content, r.chosen.strip()) for r in rows]


def in_trainer(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams
    from rlhf_engine.models.gguf import build_smollm2

    path = str(build_smollm2())
    params = SamplingParams(max_new_tokens=TOKENS, temperature=0)
    prompts = [
        [
            {
                "role": "user",
                "content": TEMPLATE.replace("{{item.question}}", q).replace("{{sample.output_text}}", a),
            }
        ]
        for q, a in pairs
    ]
    with ChatGenerator.load(path, score_replies=False) as engine:
        engine.generate(prompts[0], params)  # warm
        started = time.monotonic()
        futures = [engine.submit(p, params) for p in prompts]
        replies = [f.result().choices[0].text for f in futures]
        seconds = time.monotonic() - started
    return {"seconds": round(seconds, 2), "samples_per_s": round(len(pairs) / seconds, 2), "replies": replies}


def through_workers(base: str, key: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    import httpx

    grader = GRADER
    headers = {"Authorization": f"Bearer {key}"}

    def one(pair: tuple[str, str]) -> dict[str, Any]:
        body = {"grader": grader, "model_sample": pair[1], "item": {"question": pair[0]}}
        r = httpx.post(f"{base}/v1/fine_tuning/alpha/graders/run", json=body, headers=headers, timeout=300)
        r.raise_for_status()
        return dict(r.json())

    deadline = time.monotonic() + 600
    while (first := one(pairs[0]))["metadata"]["errors"]["model_grader_server_error"]:  # the judge loads
        if time.monotonic() > deadline:
            raise RuntimeError(f"the judge did not answer in 600 s: {first['metadata']['errors']}")
        time.sleep(2)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        out = list(pool.map(one, pairs))
    seconds = time.monotonic() - started
    flags: dict[str, int] = {}
    for o in out:
        for flag, on in o["metadata"]["errors"].items():
            if on is True:
                flags[flag] = flags.get(flag, 0) + 1
    return {
        "seconds": round(seconds, 2),
        "samples_per_s": round(len(pairs) / seconds, 2),
        "flags": flags,  # model_grader_parse_error: a reply that is neither yes nor no
        "passed": sum(o["reward"] == 1.0 for o in out),
    }


def grpo_share(base: str, key: str, data: Path, steps: int) -> dict[str, Any]:
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{base}/v1", api_key=key, timeout=120)
    rows = [{"messages": [{"role": "user", "content": q}], "question": q} for q, _ in workload(4 * steps + 8)]
    path = data / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = sdk.files.create(file=path.open("rb"), purpose="fine-tune")
    grader: Any = GRADER
    method: Any = {
        "type": "reinforcement",
        "reinforcement": {"grader": grader, "hyperparameters": {"batch_size": 4}},
    }
    job = sdk.fine_tuning.jobs.create(
        model=JUDGE,
        training_file=train.id,
        method=method,
        extra_body={"config": {"ppo": {"max_steps": steps, "max_answer_len": 48}}},
    )
    started = time.monotonic()
    while (job := sdk.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() - started > 3600:
            raise RuntimeError(f"{job.id} still {job.status}")
        time.sleep(5)
    metrics: list[Any] = [
        e.data for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"
    ]
    metrics = sorted(metrics, key=lambda m: m["step"])
    per = [
        {
            "step": m["step"],
            "score_s": round(m["score_s"], 2),
            "step_s": round(m["gen_s"] + m["score_s"] + m["train_s"] + m["other_s"], 2),
            "grader_error_rate": m.get("grader_error_rate"),
        }
        for m in metrics
    ]
    cost: Any = job.to_dict().get("cost", {})
    return {
        "status": job.status,
        "error": job.error.message if job.error else None,
        "steps": per,
        "judge_share": round(sum(p["score_s"] for p in per) / max(sum(p["step_s"] for p in per), 1e-9), 3),
        "judge_requests": cost.get("judge_requests"),
        "judge_tokens": cost.get("judge_tokens"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ns = ap.parse_args()
    probe = machine_probe()
    pairs = workload(ns.prompts)
    trainer = [in_trainer(pairs)]
    data = Path(tempfile.mkdtemp(prefix="judges-"))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"RLHF_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    server, base = start_all_in_one(data, env)
    try:
        if not wait_healthy(base, server, timeout_s=120):
            print(f"the server did not start; see {data / 'server.log'}", file=sys.stderr)
            return 1
        key = create_key(env, "bench", "judges")
        workers = through_workers(base, key, pairs)
        share = grpo_share(base, key, data, ns.steps)
    finally:
        stop_server(server)
    trainer.append(in_trainer(pairs))
    in_process = statistics.median(t["samples_per_s"] for t in trainer)
    out = {
        "bench": "judges",
        "judge": JUDGE,
        "prompts": len(pairs),
        "reply_tokens": TOKENS,
        "in_trainer": {
            "samples_per_s": in_process,
            "runs": [{k: v for k, v in t.items() if k != "replies"} for t in trainer],
        },
        "through_workers": workers,
        "workers_vs_trainer": round(workers["samples_per_s"] / in_process, 3),
        "grpo": share,
        "machine": probe,
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"judges-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
