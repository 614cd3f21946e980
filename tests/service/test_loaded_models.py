"""An inference worker keeps at most `inference_max_models` engines, evicting the least recently used
idle one. A model it has just loaded for a request is that request's: another model's load finishing
a moment later must not evict it first. (Found by the console's side-by-side test: three models of one
job asked for at once, with a cap of two, and the first column got "the model was evicted while
loading; retry".)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_engine.config.chat import SamplingParams
from service.settings import Settings
from workers.inference import InferenceServicer, LoadedModels


def _models(run: Path) -> dict[str, str]:
    return {
        "sft": str(run / "step1_sft"),
        "rlhf": str(run / "step3_rlhf" / "actor"),
        "ema": str(run / "step3_rlhf" / "actor_ema"),
    }


@pytest.fixture
def engines(pipeline_run: Path) -> Iterator[LoadedModels]:
    e = LoadedModels(Settings(data_dir=pipeline_run.parent, inference_max_models=2))
    yield e
    e.close()


def test_a_model_loaded_for_a_request_is_never_evicted_before_the_request_has_it(
    engines: LoadedModels, pipeline_run: Path
) -> None:
    got = {name: engines.load_acquired(name, path) for name, path in _models(pipeline_run).items()}
    assert sorted(engines.ids()) == ["ema", "rlhf", "sft"]  # over the cap while all three are busy
    for engine in got.values():  # each request's engine answers
        reply = engine.generate(
            [{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_new_tokens=2)
        )
        assert reply.usage.completion_tokens >= 1
    engines.release("sft")  # the least recently used idle one goes once it is idle
    assert sorted(engines.ids()) == ["ema", "rlhf"]
    engines.release("rlhf")
    engines.release("ema")
    assert engines.active() == 0 and sorted(engines.ids()) == ["ema", "rlhf"]
    assert engines.load_acquired("rlhf", "") is got["rlhf"]  # loaded: found, not loaded again
    engines.release("rlhf")


def test_a_caller_hanging_up_while_its_model_loads_leaves_nothing_busy(
    engines: LoadedModels, pipeline_run: Path
) -> None:
    servicer = InferenceServicer("w", engines)

    async def hang_up() -> None:  # the server's loop runs on after a caller hangs up: so does this one
        task = asyncio.ensure_future(servicer._load_acquired("sft", _models(pipeline_run)["sft"]))
        await asyncio.sleep(0)  # the load has started in its thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 60
        while "sft" not in engines.ids() or engines.active():  # the load went on; its engine was given back
            assert time.monotonic() < deadline, (engines.ids(), engines.active())
            await asyncio.sleep(0.05)

    asyncio.run(hang_up())
