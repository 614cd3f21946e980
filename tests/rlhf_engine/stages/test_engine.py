"""DeepSpeed behaviour of the steps: ZeRO stages agree, LoRA trains what it should, 2 processes
equal 1, a killed run resumes exactly, and bad input stops before anything starts.

ZeRO-3 runs set `--zero-param-persistence-threshold 0`: tiny models would otherwise keep every
parameter resident and hide partitioning bugs (docs/cpu.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_engine.stages.records import read_jsonl
from tests.runs import FAST, SMALL, kill_after_first_checkpoint, rlhf, rlhf_ok


def _losses(step_dir: Path) -> list[float]:
    return [m["loss"] for m in read_jsonl(step_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_zero_stages_give_the_same_losses(tmp_path: Path, base_model: Path) -> None:
    runs = {}
    for stage, extra in (
        (0, []),
        (2, []),
        (3, ["--zero-param-persistence-threshold", 0]),
        (2, ["--offload", "--gradient-checkpointing"]),
    ):
        out = tmp_path / f"z{stage}{len(extra)}"
        rlhf_ok(
            "sft",
            "--model",
            base_model,
            "--output-dir",
            out,
            "--zero-stage",
            stage,
            *extra,
            "--dropout",
            0,
            "--max-steps",
            6,
            "--gradient-accumulation-steps",
            2,
            *FAST,
        )
        runs[(stage, len(extra))] = out / "step1_sft"
    ref = _losses(runs[(0, 0)])
    assert len(ref) == 6 and ref[-1] < ref[0]
    for key, step_dir in runs.items():
        assert _losses(step_dir) == pytest.approx(ref, rel=1e-4), key
    # the saved weights agree too (ZeRO-3 gathers every partitioned parameter)
    w0 = load_file(str(runs[(0, 0)] / "model.safetensors"))
    w3 = load_file(str(runs[(3, 2)] / "model.safetensors"))
    assert w0.keys() == w3.keys()
    assert max(float((w0[k] - w3[k]).abs().max()) for k in w0) < 1e-3


def _changed(base: dict, trained: dict) -> set[str]:
    return {k for k in base if not (base[k] == trained[k]).all()}


@pytest.mark.slow
def test_lora_trains_only_what_it_should(tmp_path: Path, base_model: Path) -> None:
    base = load_file(str(base_model / "model.safetensors"))
    only = tmp_path / "only"
    rlhf_ok(
        "sft",
        "--model",
        base_model,
        "--output-dir",
        only,
        "--lora-dim",
        4,
        "--only-optimize-lora",
        "--zero-stage",
        3,
        "--zero-param-persistence-threshold",
        0,
        "--max-steps",
        4,
        *FAST,
    )
    merged = load_file(str(only / "step1_sft" / "model.safetensors"))
    assert merged.keys() == base.keys()  # LoRA fused on save: a plain model, no adapter weights
    changed = _changed(base, merged)
    linear = {k for k in base if k.endswith("proj.weight") or k.endswith(("fc1.weight", "fc2.weight"))}
    assert changed and changed <= linear  # only the adapted linear layers moved
    assert not any("embed" in k or "layer_norm" in k or k.endswith(".bias") for k in changed)
    # the frozen base's LoRA weights also as a PEFT adapter naming that base: served on the shared base,
    # it answers as the merged model does
    adapter = only / "step1_sft" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_model) and config["r"] == 4
    assert all(".lora_" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    from rlhf_engine.chat import ChatGenerator, SamplingParams

    turn = [{"role": "user", "content": "What color is the dog?"}]
    greedy = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    with ChatGenerator.load(str(only / "step1_sft"), backend="transformers") as engine:
        want = engine.generate(turn, greedy).choices[0].token_ids
    with ChatGenerator.load(str(base_model), backend="transformers") as engine:
        engine.load_adapter("sft", adapter)
        assert engine.generate(turn, greedy, adapter="sft").choices[0].token_ids == want

    full = tmp_path / "full"  # options from a config file this time (flags still win: --max-steps)
    (tmp_path / "step1.yaml").write_text(
        "lora_dim: 4\nlora-target-modules: [q_proj, v_proj]\nmax_steps: 50\n"
    )
    rlhf_ok(
        "sft",
        "--model",
        base_model,
        "--output-dir",
        full,
        "--config",
        tmp_path / "step1.yaml",
        "--max-steps",
        4,
        *FAST,
    )
    summary = json.loads((full / "step1_sft" / "summary.json").read_text())
    assert summary["global_steps"] == 4 and summary["options"]["model"]["lora_target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    changed_full = _changed(base, load_file(str(full / "step1_sft" / "model.safetensors")))
    assert any("embed_tokens" in k for k in changed_full) and any("layer_norm" in k for k in changed_full)

    rm = tmp_path / "rm"
    rlhf_ok(
        "reward",
        "--model",
        base_model,
        "--output-dir",
        rm,
        "--lora-dim",
        4,
        "--only-optimize-lora",
        "--max-steps",
        4,
        *FAST,
    )
    rm_weights = load_file(str(rm / "step2_reward" / "model.safetensors"))
    assert "score.weight" in rm_weights  # the new head trains even when only LoRA is optimised
    assert not any("lora" in k for k in rm_weights)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,stage,arch", [("deepspeed", 2, "opt"), ("torchrun", 3, "llama")])
def test_two_processes_equal_one_process_at_the_same_global_batch(
    tmp_path: Path, base_model: Path, launcher: str, stage: int, arch: str
) -> None:
    """ZeRO-3 over two ranks on a rotary model (Llama, with LoRA): every parameter partitioned, the
    model gathered for saving, the folder's lock shared by the ranks (fencing.py)."""
    from rlhf_engine.models.tiny import build_tiny

    model = base_model if arch == "opt" else build_tiny("llama", "xs")
    lora = ["--lora-dim", 4] if arch == "llama" else []
    common = [
        "--model",
        model,
        "--dropout",
        0,
        "--max-steps",
        6,
        "--zero-stage",
        stage,
        "--zero-param-persistence-threshold",
        0,
        *lora,
        *FAST,
    ]
    rlhf_ok("sft", "--output-dir", tmp_path / "one", "--gradient-accumulation-steps", 2, *common)
    two = rlhf(
        "sft",
        "--output-dir",
        tmp_path / "two",
        "--gradient-accumulation-steps",
        1,
        "--num-gpus",
        2,
        "--launcher",
        launcher,
        *common,
    )
    assert two.returncode == 0, two.stderr[-3000:]  # decided by summary.json, not the launcher's exit
    summary = json.loads((tmp_path / "two" / "step1_sft" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert _losses(tmp_path / "two" / "step1_sft") == pytest.approx(
        _losses(tmp_path / "one" / "step1_sft"), rel=1e-5
    )
    # the model gathered from two ranks' partitions equals the single-process one
    w1 = load_file(str(tmp_path / "one" / "step1_sft" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "step1_sft" / "model.safetensors"))
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4
    assert w2.keys() == load_file(str(Path(model) / "model.safetensors")).keys()  # the input's keys, no more


@pytest.mark.slow
def test_resume_after_sigkill_continues_exactly(tmp_path: Path, base_model: Path) -> None:
    args = [
        "sft",
        "--model",
        base_model,
        "--per-device-train-batch-size",
        2,
        "--max-steps",
        150,
        "--checkpoint-interval",
        10,
        "--max-seq-len",
        128,
        "--eval-max-rows",
        16,
    ]  # dropout stays on
    rlhf_ok(*args, "--output-dir", tmp_path / "straight")
    killed_dir = tmp_path / "killed" / "step1_sft"
    k = kill_after_first_checkpoint([*args, "--output-dir", tmp_path / "killed"], killed_dir)
    assert k < 150
    events = killed_dir / "events.jsonl"

    rlhf_ok(*args, "--output-dir", tmp_path / "killed")
    straight, resumed = (
        read_jsonl(tmp_path / "straight" / "step1_sft" / "metrics.jsonl"),
        read_jsonl(killed_dir / "metrics.jsonl"),
    )
    assert [m["step"] for m in resumed] == list(range(1, 151))  # no step lost, none twice
    assert [m["loss"] for m in resumed[k:]] == pytest.approx([m["loss"] for m in straight[k:]], abs=1e-6)
    assert any(e["type"] == "step_started" and "resum" in e["message"] for e in read_jsonl(events))


@pytest.mark.slow
def test_overwrite_retrains_from_scratch(tmp_path: Path, base_model: Path) -> None:
    args = [
        "sft",
        "--model",
        base_model,
        "--output-dir",
        tmp_path,
        "--max-steps",
        6,
        "--checkpoint-interval",
        2,
        *FAST[:2],
        *FAST[4:],
    ]
    rlhf_ok(*args)
    step_dir = tmp_path / "step1_sft"
    mtime = (step_dir / "model.safetensors").stat().st_mtime_ns
    rlhf_ok(*args, "--overwrite")  # ignores the finished run's checkpoints: trains steps 1..6 again
    assert (step_dir / "model.safetensors").stat().st_mtime_ns != mtime
    assert [m["step"] for m in read_jsonl(step_dir / "metrics.jsonl")] == list(range(1, 7))
    assert not any("resum" in e["message"] for e in read_jsonl(step_dir / "events.jsonl"))


BAD = [
    (["--model", "/no/such/model"], "model_name_or_path: /no/such/model does not exist"),
    (["--dtype", "fp16"], "fp16 is not supported on CPU"),
    (["--offload"], "offload needs zero_stage"),
    (["--only-optimize-lora"], "only_optimize_lora needs lora_dim"),
    (["--learning-rate", "2"], "learning_rate 2.0 must be in (0, 1)"),
    (["--zero-stage", "4"], "zero_stage 4 must be"),
    (["--per-device-train-batch-size", "100000"], "is more than the"),
    (["--data-split", "10,0,0"], "zero share"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_before_training(
    tmp_path: Path, base_model: Path, args: list[str], message: str
) -> None:
    cmd = "reward" if "--data-split" in args else "sft"
    given = ["--model", base_model] if "--model" not in args else []
    done = rlhf(cmd, *given, *args, "--output-dir", tmp_path, *SMALL)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*/metrics.jsonl"))  # no training step ran


def test_a_reward_model_is_not_a_causal_lm(tmp_path: Path, reward_run: Path) -> None:
    done = rlhf("sft", "--model", reward_run, "--output-dir", tmp_path, *SMALL)
    assert done.returncode == 2 and "not a causal LM" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_a_checkpoint_keeps_a_chat_model_that_loads_as_the_model_then(tmp_path: Path) -> None:
    """A Llama-family model with LoRA at ZeRO-3: the checkpoint at step 2 holds its chat model (LoRA merged,
    safetensors, the tokenizer beside it), and it is the model as it was at step 2 — not the final one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_engine.models.tiny import build_tiny

    llama = build_tiny("llama", "xs", pretrain_steps=0)
    args = ["sft", "--model", llama, *FAST[:2], "--max-seq-len", 64, "--eval-max-rows", 8]
    args += ["--max-steps", 3, "--checkpoint-interval", 2, "--lora-dim", 4, "--zero-stage", 3]
    rlhf_ok(*args, "--zero-param-persistence-threshold", 0, "--output-dir", tmp_path)
    step_dir = tmp_path / "step1_sft"
    saved = [e for e in read_jsonl(step_dir / "events.jsonl") if e["type"] == "checkpoint_saved"]
    assert [e["data"]["global_step"] for e in saved] == [2]
    chat = Path(saved[0]["data"]["model_path"])
    assert chat.name == "chat_model" and chat.parent.name == "global_step2"
    assert {p.suffix for p in chat.iterdir()} >= {".safetensors", ".json"}
    assert not any(p.suffix in (".bin", ".pt") for p in chat.iterdir())
    at_2 = AutoModelForCausalLM.from_pretrained(str(chat)).eval()
    final = AutoModelForCausalLM.from_pretrained(str(step_dir)).eval()
    assert (
        AutoTokenizer.from_pretrained(str(chat)).chat_template
        == AutoTokenizer.from_pretrained(str(step_dir)).chat_template
    )
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    base = AutoModelForCausalLM.from_pretrained(str(llama)).eval()
    with torch.no_grad():
        a, b, c = at_2(ids).logits, final(ids).logits, base(ids).logits
    assert a.shape == b.shape and not torch.allclose(a, b)  # one more step trained the final model
    assert not torch.allclose(a, c)  # and two steps the checkpoint's: LoRA merged into it
    assert not any(p.name.startswith(".chat_model") for p in chat.parent.iterdir())  # no half-written copy
