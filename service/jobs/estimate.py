"""What a planned job will take: tokens, seconds and dollars per step, from its options, the sizes of
its data (uploaded files, or server-side datasets read once per process) and its models' parameters."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from rlhf_engine.config.data import DataConfig, parse_split
from rlhf_engine.config.pipeline import STEPS
from rlhf_engine.planner import KNOWN_PARAMS_B
from service.db.models import File
from service.services import cost as costs
from service.services import files as files_svc
from service.services import models as models_svc


def model_params(path: Path) -> float:
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            return costs.params_from_config(json.loads(cfg_file.read_text()))
        except (OSError, ValueError):
            pass
    name = path.name
    if models_svc.TINY_RE.fullmatch(name):
        return {"xs": 0.00053, "s": 0.0034, "m": 0.0258}[name.rsplit("-", 1)[1]]
    if name == models_svc.SMOLLM2:
        return 0.1345
    if name == models_svc.SMOLLM2_RM:
        return 0.0067
    return KNOWN_PARAMS_B.get(name, 1.0)


# ---------------------------------------------------------------------------- estimate


def _rows_and_tokens(paths: list[str], files: list[File]) -> tuple[int, float]:
    """Rows and mean tokens per row of the datasets a step reads (uploaded files or bundled data)."""
    by_path = {f.path: f for f in files}
    rows, tokens = 0, 0
    for p in paths:
        if p in by_path:
            rows += by_path[p].rows
            tokens += by_path[p].tokens_estimate
        else:
            d = server_data(p)
            r, t = d.rows, d.tokens
            rows, tokens = rows + r, tokens + t
    return rows, (tokens / rows if rows else 0.0)


@dataclasses.dataclass(frozen=True)
class ServerData:
    rows: int
    tokens: int  # estimated
    kind: str | None  # None: it cannot be read here (e.g. a hub id)
    own_eval: bool  # it has its own eval split


@functools.lru_cache(maxsize=16)
def server_data(name: str) -> ServerData:
    """A bundled (or server-side) dataset's size and kind, read once per process."""
    from rlhf_engine.data.readers import read_dataset

    try:
        ds = read_dataset(name)
    except ValueError:
        return ServerData(0, 0, None, False)
    if ds.kind == "text":
        return ServerData(
            len(ds), sum(len(t) for t in ds.texts or []) // files_svc.CHARS_PER_TOKEN, ds.kind, False
        )
    tokens = sum(len(s.prompt_text) + len(s.chosen) for s in ds.rows) // files_svc.CHARS_PER_TOKEN
    return ServerData(len(ds.rows), tokens, ds.kind, ds.eval_rows is not None)


def estimate_steps(
    *,
    plan: dict[str, Any],
    steps: list[int],
    method: str,
    files: list[File],
    actor_params: float,
    reward_params: float,
    gpu_type: str,
    num_gpus: int,
    tokens_override: dict[str, int] | None = None,
) -> list[costs.StepCost]:
    out = []
    for step in steps:
        v = plan[str(step)]
        cls = STEPS["dpo" if method == "dpo" else "rlhf"][step].config
        get = lambda name, v=v, cls=cls: v.get(name, step_default(cls, name))  # noqa: E731
        params = reward_params if step == 2 and method != "dpo" else actor_params  # DPO trains the actor
        if tokens_override and str(step) in tokens_override:
            tokens = int(tokens_override[str(step)])
        else:
            rows, per_row = _rows_and_tokens(list(v.get("data") or DataConfig().data), files)
            share = parse_split(v.get("data_split", DataConfig().data_split))[step - 1]
            usable = rows * share * (1 - v.get("eval_fraction", DataConfig().eval_fraction))
            epochs = get("num_train_epochs")
            if step < 3:
                batch = get("per_device_train_batch_size") * get("gradient_accumulation_steps") * num_gpus
                n = (
                    usable * epochs
                    if not get("max_steps")
                    else min(usable * epochs, get("max_steps") * batch)
                )
                seq = min(per_row, v.get("max_seq_len", DataConfig().max_seq_len))
                tokens = int(n * seq * (2 if step == 2 else 1))
            else:
                batch = get("per_device_generation_batch_size") * get("generation_batches") * num_gpus
                n = (
                    usable * epochs
                    if not get("max_steps")
                    else min(usable * epochs, get("max_steps") * batch)
                )
                prompt = min(per_row * 0.5, v.get("max_prompt_len", DataConfig().max_prompt_len))
                # grpo/rloo sample (and train on) samples_per_prompt answers to every prompt
                tokens = int(n * (prompt + get("max_answer_len")) * get("samples_per_prompt"))
        out.append(
            costs.step_cost(step, tokens=tokens, params_b=params, gpu_type=gpu_type, num_gpus=num_gpus)
        )
    return out


def step_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)
