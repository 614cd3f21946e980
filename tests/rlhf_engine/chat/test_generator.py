"""The chat generator on a real tiny model: streaming, finish reasons, backends, concurrency, cancel, safety.

One engine (transformers backend, the xs OPT pretrained on the bundled corpus) serves most tests.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.chat.errors import (
    ChatRequestError,
    ContextLengthExceededError,
    GeneratorBusyError,
    GeneratorStoppedError,
    ModelLoadError,
)
from rlhf_engine.chat.generator import RequestHandle

DOG = [{"role": "user", "content": "What is a dog?"}]
QUESTIONS = ["What is a dog?", "Tell me about the kite.", "Where does the owl live?"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine(base_model: Path) -> Iterator[ChatGenerator]:
    with ChatGenerator.load(str(base_model), backend="transformers") as e:
        yield e


def wait_idle(engine: ChatGenerator, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while engine.running or engine.waiting:
        assert time.monotonic() < deadline, "the engine kept generating"
        time.sleep(0.005)


# ---------------------------------------------------------------- streaming and finish reasons


def test_stream_is_incremental_and_joins_to_the_whole_reply(engine: ChatGenerator) -> None:
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=40, ignore_eos=True)
    handle = engine.submit(DOG, params)
    deltas = list(handle)
    assert sum(1 for d in deltas if d.text) > 5
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length"
    streamed = "".join(d.text for d in deltas)
    ids = [t for d in deltas for t in d.token_ids]
    whole = engine.generate(DOG, params)
    assert whole.choices[0].text == streamed
    assert whole.choices[0].token_ids == ids
    assert streamed == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert handle.usage.completion_tokens == 40
    assert handle.usage.prompt_tokens == len(engine.prompt_ids(DOG))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 40


def test_finish_reasons_eos_stop_string_and_length(engine: ChatGenerator) -> None:
    # EOS: the tiny model ends its answer to this question by itself
    eos = engine.generate(DOG, SamplingParams(temperature=0, max_new_tokens=60)).choices[0]
    assert eos.finish_reason == "stop" and eos.token_ids[-1] == engine.tokenizer.eos_token_id
    assert len(eos.token_ids) < 60
    # a stop string found in the middle of the greedy reply ends it just before the string
    full = (
        engine.generate(DOG, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))
        .choices[0]
        .text
    )
    stop = full.split()[2]
    cut = engine.generate(DOG, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=[stop]))
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 30
    streamed = "".join(
        d.text
        for d in engine.stream(
            DOG, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=[stop])
        )
    )
    assert streamed == cut.choices[0].text
    # max_new_tokens
    short = engine.generate(DOG, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    assert short.choices[0].finish_reason == "length" and len(short.choices[0].token_ids) == 3


def test_greedy_tokens_equal_transformers_generate_and_deepspeed_inference(
    engine: ChatGenerator, base_model: Path
) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(base_model)).eval()
    ours = {}
    for q in QUESTIONS:
        ids = torch.tensor([engine.prompt_ids(user(q))])
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=40,
            pad_token_id=engine.tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        ours[q] = (
            engine.generate(user(q), SamplingParams(temperature=0, max_new_tokens=40)).choices[0].token_ids
        )
        assert ours[q] == ref, q
    with ChatGenerator.load(str(base_model), backend="deepspeed") as ds:
        from deepspeed.inference.engine import InferenceEngine

        assert isinstance(
            ds.loaded.model, InferenceEngine
        )  # the forward runs through deepspeed.init_inference
        for q in QUESTIONS:
            assert (
                ds.generate(user(q), SamplingParams(temperature=0, max_new_tokens=40)).choices[0].token_ids
                == ours[q]
            )


# ---------------------------------------------------------------- concurrency


def test_a_second_request_does_not_wait_for_the_first_to_finish(engine: ChatGenerator) -> None:
    long = engine.submit(DOG, SamplingParams(max_new_tokens=450, ignore_eos=True, seed=1))
    it = iter(long)
    next(it)
    short = engine.submit(user("Hi"), SamplingParams(max_new_tokens=5, ignore_eos=True, seed=2))
    assert short.result().usage.completion_tokens == 5
    assert sum(len(d.token_ids) for d in it) == 450 - 1
    # the short request started, and finished, while the long one was still generating
    assert short.first_token_at is not None and short.finished_at is not None and long.finished_at is not None
    assert short.finished_at < long.finished_at
    wait_idle(engine)


def test_a_seed_gives_the_same_tokens_alone_and_batched(engine: ChatGenerator) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_new_tokens=30, ignore_eos=True)
    alone = engine.generate(DOG, params).choices[0].token_ids
    others = [
        engine.submit(user(q), SamplingParams(seed=i, max_new_tokens=20 + 15 * i, ignore_eos=True))
        for i, q in enumerate(QUESTIONS)
    ]
    first = iter(others[0])
    next(first)  # the batch is running when ours joins it
    batched = engine.submit(DOG, params)
    later = engine.submit(
        user("Why do cats sleep?"), SamplingParams(seed=9, max_new_tokens=10, ignore_eos=True)
    )
    assert batched.result().choices[0].token_ids == alone
    for h in [*others[1:], later]:
        h.result()
    assert sum(len(d.token_ids) for d in first) == 20 - 1
    # n replies: reply i uses seed + i
    two = engine.generate(
        DOG, SamplingParams(temperature=1.0, top_p=0.95, seed=11, n=2, max_new_tokens=30, ignore_eos=True)
    )
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].token_ids == alone
    seed12 = SamplingParams(temperature=1.0, top_p=0.95, seed=12, max_new_tokens=30, ignore_eos=True)
    assert engine.generate(DOG, seed12).choices[0].token_ids == two.choices[1].token_ids
    assert two.usage.completion_tokens == 60


def test_cancel_stops_generation(engine: ChatGenerator) -> None:
    handle = engine.submit(DOG, SamplingParams(max_new_tokens=450, ignore_eos=True, seed=3))
    it = iter(handle)
    for _ in range(3):
        next(it)
    handle.cancel()
    rest = list(it)
    assert rest[-1].finish_reason == "cancelled"
    assert handle.usage.completion_tokens < 100
    wait_idle(engine)
    assert (
        engine.generate(DOG, SamplingParams(max_new_tokens=4, ignore_eos=True)).usage.completion_tokens == 4
    )


def test_a_reader_that_stops_reading_cancels_its_request(engine: ChatGenerator) -> None:
    handle = engine.submit(DOG, SamplingParams(max_new_tokens=450, ignore_eos=True, seed=4))
    for i, _ in enumerate(handle):
        if i == 2:
            break  # a client that went away
    assert handle.cancelled
    wait_idle(engine)
    assert handle.usage.completion_tokens < 100


def test_an_asyncio_reader_gets_the_same_stream_and_leaving_cancels(engine: ChatGenerator) -> None:
    """`aiter()` (the inference worker's reader: woken per token, no thread per request)."""
    import asyncio

    params = SamplingParams(max_new_tokens=40, ignore_eos=True, seed=9, n=2)
    whole = engine.generate(DOG, params)

    async def read() -> tuple[dict[int, str], RequestHandle]:
        handle = engine.submit(DOG, params)
        texts: dict[int, str] = {0: "", 1: ""}
        async for d in handle.aiter():
            texts[d.index] += d.text
        early = engine.submit(DOG, SamplingParams(max_new_tokens=450, ignore_eos=True, seed=4))
        async for i, _ in _enumerate(early.aiter()):
            if i == 2:
                break  # a client that went away
        return texts, early

    texts, early = asyncio.run(read())
    assert texts == {c.index: c.text for c in whole.choices}
    assert early.cancelled
    wait_idle(engine)
    assert early.usage.completion_tokens < 100


async def _enumerate(it: Any) -> Any:
    i = 0
    async for x in it:
        yield i, x
        i += 1


def test_full_queue_is_busy_and_close_ends_every_request(base_model: Path) -> None:
    e = ChatGenerator.load(str(base_model), max_batch_size=1, max_queue=1, max_n=1)
    running = e.submit(DOG, SamplingParams(max_new_tokens=450, ignore_eos=True))
    it = iter(running)
    next(it)
    queued = e.submit(DOG, SamplingParams(max_new_tokens=4))
    with pytest.raises(GeneratorBusyError, match="retry"):
        e.submit(DOG, SamplingParams(max_new_tokens=4))
    e.close()
    with pytest.raises(GeneratorStoppedError):
        list(it)
    with pytest.raises(GeneratorStoppedError):
        list(queued)
    with pytest.raises(GeneratorStoppedError, match="closed"):
        e.submit(DOG)


# ---------------------------------------------------------------- requests the engine refuses


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "messages"),
    ],
)
def test_bad_conversations_name_the_field(
    engine: ChatGenerator, messages: list[dict[str, object]], param: str
) -> None:
    with pytest.raises(ChatRequestError) as e:
        engine.submit(messages)
    assert e.value.param == param


def test_context_length_and_server_limits(engine: ChatGenerator) -> None:
    with pytest.raises(ContextLengthExceededError, match="shorten the conversation"):
        engine.submit(user("dog " * 600))
    prompt = len(engine.prompt_ids(DOG))
    with pytest.raises(ContextLengthExceededError, match=f"at most {512 - prompt} new tokens fit"):
        engine.submit(DOG, SamplingParams(max_new_tokens=512))
    with pytest.raises(ChatRequestError, match="n: 9 is above this server's limit of 8"):
        engine.submit(DOG, SamplingParams(n=9))
    # without max_new_tokens the reply gets the default, shrunk to what the context has left
    long_prompt = user("dog " * 300)
    room = 512 - len(engine.prompt_ids(long_prompt))
    assert 0 < room < 256
    res = engine.generate(long_prompt, SamplingParams(ignore_eos=True, temperature=0))
    assert res.usage.completion_tokens == room and res.choices[0].finish_reason == "length"


def test_chat_prompt_tokens_equal_step_1_prompt_tokens(engine: ChatGenerator) -> None:
    from rlhf_engine.config.data import DataConfig
    from rlhf_engine.data.prepare import load_datasets
    from rlhf_engine.data.tokenize import tokenize_rows

    rows = load_datasets(DataConfig(data=["bundled:sft"]))[0].rows[:20]
    tokenized, _ = tokenize_rows(1, rows, engine.tokenizer, max_seq_len=512, max_prompt_len=256)
    for row, (ids, prompt_len, _) in zip(rows, tokenized, strict=True):
        messages = [m.as_dict() for m in row.conversation]
        assert engine.prompt_ids(messages) == list(ids[:prompt_len])


# ---------------------------------------------------------------- loading safely


def test_pickled_weights_are_refused_unless_allowed(base_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(base_model, model)
    state = load_file(str(model / "model.safetensors"))
    torch.save(state, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"only pickled weights \(pytorch_model.bin\).*allow_pickle"):
        ChatGenerator.load(str(model))
    with ChatGenerator.load(str(model), allow_pickle=True) as e, ChatGenerator.load(str(base_model)) as ref:
        greedy = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
        assert e.generate(DOG, greedy).choices[0].token_ids == ref.generate(DOG, greedy).choices[0].token_ids


def test_models_that_cannot_be_served_are_refused_clearly(base_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ChatGenerator.load(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="holds no model"):
        ChatGenerator.load(str(tmp_path))
    custom = tmp_path / "custom"
    shutil.copytree(base_model, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code is off"):
        ChatGenerator.load(str(custom))
    with pytest.raises(ModelLoadError, match="kernel_inject: DeepSpeed's inference kernels need CUDA"):
        ChatGenerator.load(str(base_model), kernel_inject=True, device="cpu")
    with pytest.raises(ModelLoadError, match="dtype: fp16 is not supported on CPU"):
        ChatGenerator.load(str(base_model), dtype="fp16", device="cpu")


# ---------------------------------------------------------------- models from a training run


def test_run_directory_serves_the_actor_and_scores_replies(pipeline_run: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from rlhf_engine.data.formatter import encode_answer, encode_prompt

    rm = AutoModelForSequenceClassification.from_pretrained(str(pipeline_run / "step2_reward")).eval()
    with ChatGenerator.load(str(pipeline_run)) as e:
        assert e.loaded.model_dir == (pipeline_run / "step3_rlhf" / "actor").resolve()
        result = e.generate(DOG, SamplingParams(seed=0, max_new_tokens=30, n=2))
        for choice in result.choices:
            ids = encode_prompt(DOG, e.tokenizer) + encode_answer(DOG, choice.text, e.tokenizer)
            with torch.no_grad():
                expected = float(rm(torch.tensor([ids])).logits[0, 0])
            assert choice.reward == pytest.approx(expected, abs=1e-4)
    with ChatGenerator.load(str(pipeline_run / "step3_rlhf" / "actor_ema"), score_replies=False) as e:
        assert e.scorer is None
        assert e.generate(DOG, SamplingParams(max_new_tokens=5)).choices[0].reward is None


def test_three_models_of_a_run_load_at_once_in_threads(pipeline_run: Path) -> None:
    """What an inference worker does when a console compares a job's SFT, RLHF and EMA models: three
    loads at once (each with the run's reward model). transformers' loading is not thread-safe: before
    the per-process load lock, two of three failed ("Cannot copy out of meta tensor", a half-done import)."""
    import threading

    paths = [
        pipeline_run / "step1_sft",
        pipeline_run / "step3_rlhf" / "actor",
        pipeline_run / "step3_rlhf" / "actor_ema",
    ]
    replies: dict[str, str] = {}
    errors: list[str] = []

    def load(path: Path) -> None:
        try:
            with ChatGenerator.load(str(path)) as e:
                replies[path.name] = (
                    e.generate(DOG, SamplingParams(temperature=0, max_new_tokens=8)).choices[0].text
                )
        except Exception as ex:  # collected: an exception in a thread would not fail the test
            errors.append(f"{path}: {ex!r}")

    threads = [threading.Thread(target=load, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(replies) == 3, errors
