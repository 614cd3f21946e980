"""The inference worker (`rlhf worker inference`): serves finished models to the API over gRPC.

It listens on an internal endpoint (proto/rlhf/internal/v1/worker.proto), registers its address,
models, capacity and heartbeat in the database, and loads a model on the first request for it,
keeping at most `inference_max_models` (the least recently used idle one is evicted). The API
routes each chat request to a live worker that holds the model, or to the least loaded one, which
then loads it — so a model finished after the worker started is served without a restart.

Torch runs only on each model's chat-generator thread (and once per model in the thread that loads
it): one asyncio loop tokenises requests and relays every stream, woken by the generator per token (a
second thread running torch would get its own OpenMP team and halve throughput on a small CPU).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import delete, update

from service.db.models import InferenceWorker, new_id, utcnow
from service.db.session import session_scope
from service.grpc.pb import worker_pb2, worker_pb2_grpc
from service.services import models as models_svc
from service.settings import Settings

logger = logging.getLogger(__name__)

# the chat generator's error codes (rlhf_engine.chat.errors; wire names kept) → gRPC codes; the API
# maps them back (service/services/chat.py) to the errors of service.errors.ERROR_TABLE
_CODES = {
    "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
    "context_length_exceeded": grpc.StatusCode.INVALID_ARGUMENT,
    "model_load_error": grpc.StatusCode.FAILED_PRECONDITION,
    "engine_busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "engine_stopped": grpc.StatusCode.UNAVAILABLE,
    "generation_failed": grpc.StatusCode.INTERNAL,
    "model_not_ready": grpc.StatusCode.UNAVAILABLE,
}


MAX_MESSAGE_BYTES = 64 * 2**20


class LoadedModels:
    """Loaded chat generators by model id, least recently used first."""

    def __init__(self, settings: Settings, on_change: Any = None) -> None:
        self.settings = settings
        self.on_change = on_change or (lambda: None)
        self._generators: OrderedDict[str, Any] = OrderedDict()
        self._busy: dict[str, int] = {}  # requests in flight per model
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._building: dict[str, threading.Thread] = {}
        roots = [settings.data_dir, settings.models_dir]
        self._roots = [r.resolve() for r in roots]

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._generators)

    def adapter_ids(self) -> list[str]:
        """The LoRA adapters resident on the loaded models."""
        with self._lock:
            generators = list(self._generators.values())
        return sorted({k for g in generators for k in g.adapters.resident()})

    def inside_roots(self, path: str) -> bool:
        real = Path(path).resolve()
        return any(real == r or r in real.parents for r in self._roots)

    def active(self) -> int:
        with self._lock:
            return sum(self._busy.values())

    def loading(self) -> list[str]:
        """Models being loaded now."""
        with self._lock:
            return [m for m, lock in self._loading.items() if lock.locked()]

    def load_acquired(self, model_id: str, path: str) -> Any:
        """The generator of `model_id`, loaded from `path` unless loaded (blocking: run it in a thread),
        counted busy until `release`. A fresh generator is inserted, acquired and the least recently used
        idle ones evicted in one critical section: another model's load finishing a moment later must
        not evict it before its caller gets it (three models asked for at once with a cap of two)."""
        with self._lock:
            if (generator := self._acquire(model_id)) is not None:
                return generator
            load_lock = self._loading.setdefault(model_id, threading.Lock())
        # one load per model; other requests for it wait here, as long as a load may take
        if not load_lock.acquire(timeout=self.settings.inference_load_timeout_s):
            from rlhf_engine.chat.errors import ModelNotReadyError

            raise ModelNotReadyError(
                f"model: {model_id} is still loading on this worker after "
                f"{self.settings.inference_load_timeout_s:.0f} s (RLHF_INFERENCE_LOAD_TIMEOUT_S); retry later"
            )
        try:
            with self._lock:
                if (generator := self._acquire(model_id)) is not None:
                    return generator
            self.on_change()  # the worker's row says what it is loading (an operator's view; the drill's cue)
            generator = self._load(model_id, path)
            with self._lock:
                self._generators[model_id] = generator
                self._loading.pop(model_id, None)  # later requests find the generator; waiters re-check it
                self._acquire(model_id)
                evicted = self._evict(keep=model_id)
        finally:
            load_lock.release()
        for old in evicted:
            old.close()
        self.on_change()
        return generator

    def preparing(self, model_id: str, path_str: str) -> bool:
        """True while a bundled model is not built yet; the first call starts its build in the
        background (a chat for it answers 503 at once instead of waiting for minutes). Generate asks
        this before loading, so a model is never built on the request's path."""
        path = Path(path_str)
        if (path / "config.json").exists() or not models_svc.is_bundled(path.name):
            return False
        with self._lock:
            thread = self._building.get(model_id)
            if thread is None or not thread.is_alive():
                from workers.bundled import build_bundled

                def build() -> None:
                    try:
                        logger.info("building bundled model %s on first use", path.name)
                        build_bundled(
                            path,
                            every_s=self.settings.inference_heartbeat_s,
                            tick=lambda *_: None,
                            timeout_s=self.settings.model_build_timeout_s,
                        )
                    except Exception:
                        logger.exception("building %s failed", path.name)

                thread = threading.Thread(target=build, name=f"build-{path.name}", daemon=True)
                self._building[model_id] = thread
                thread.start()
        return True

    def try_acquire(self, model_id: str) -> Any:
        """The generator if loaded (counted busy until `release`), else None — never blocks."""
        with self._lock:
            return self._acquire(model_id)

    def _acquire(self, model_id: str) -> Any:
        generator = self._generators.get(model_id)  # (call with the lock held)
        if generator is not None:
            self._generators.move_to_end(model_id)
            self._busy[model_id] = self._busy.get(model_id, 0) + 1
        return generator

    def release(self, model_id: str) -> None:
        with self._lock:
            self._busy[model_id] = max(0, self._busy.get(model_id, 0) - 1)
            evicted = self._evict()  # over the cap because every generator was busy at the last load
        for old in evicted:
            old.close()
        if evicted:
            self.on_change()

    def _evict(self, keep: str | None = None) -> list[Any]:
        """Idle generators beyond the cap, least recently used first (call with the lock held)."""
        out = []
        for model_id in list(self._generators):
            if len(self._generators) <= self.settings.inference_max_models:
                break
            if model_id != keep and self._busy.get(model_id, 0) == 0:
                logger.info(
                    "evicting %s (least recently used; cap %d)", model_id, self.settings.inference_max_models
                )
                out.append(self._generators.pop(model_id))
        return out

    def _load(self, model_id: str, path_str: str) -> Any:
        from rlhf_engine.chat.errors import ModelLoadError

        path = Path(path_str)
        if not self.inside_roots(path_str):
            raise ModelLoadError(
                f"model: {model_id} lies outside this worker's data and model roots", param="model"
            )
        try:
            return self._build(path)
        except ModelLoadError as e:  # the client knows the model by its id, not by our paths
            message = e.message.replace(str(path), model_id).replace("model_path: ", "")
            raise ModelLoadError(f"model: {model_id} cannot be served: {message}", param="model") from None

    def _build(self, path: Path) -> Any:
        from rlhf_engine.chat.generator import ChatGenerator
        from rlhf_engine.config.chat import ChatGeneratorConfig, ChatLimits

        s = self.settings
        limits = ChatLimits(
            max_new_tokens_limit=s.chat_max_tokens,
            default_max_new_tokens=s.chat_default_max_tokens,
            max_n=s.chat_max_n,
        )
        started = time.monotonic()
        generator = ChatGenerator(
            ChatGeneratorConfig(
                model_path=str(path),
                backend=s.inference_backend,
                device=s.inference_device,
                dtype=s.inference_dtype,
                max_batch_size=max(32, s.chat_max_n),
                max_queue=s.inference_capacity,
                prefix_cache_mb=s.inference_prefix_cache_mb,
                adapter_cache_mb=s.inference_adapter_cache_mb,
                limits=limits,
            )
        )
        logger.info(
            "loaded %s in %.1f s (%s backend)",
            path,
            time.monotonic() - started,
            getattr(generator.loaded, "backend", s.inference_backend),
        )
        return generator

    def close(self) -> None:
        with self._lock:
            generators, self._generators = list(self._generators.values()), OrderedDict()
        for generator in generators:
            generator.close()


async def _abort(context: grpc.aio.ServicerContext, error: Any) -> None:
    code = _CODES.get(getattr(error, "code", ""), grpc.StatusCode.INTERNAL)
    context.set_trailing_metadata((("error-code", error.code), ("error-param", error.param or "")))
    await context.abort(code, error.message)


class InferenceServicer(worker_pb2_grpc.InferenceWorkerServicer):
    """One asyncio loop serves every stream: the generator's scheduler thread wakes it per token (no
    thread per request, no thread hand-off per message)."""

    def __init__(self, worker_id: str, generators: LoadedModels) -> None:
        self.worker_id = worker_id
        self.generators = generators

    async def _load_acquired(self, model_id: str, path: str) -> Any:
        """`LoadedModels.load_acquired` in a thread; a caller hanging up meanwhile gives the generator back
        once it is loaded (the load itself goes on: the next request for the model finds it)."""
        task = asyncio.ensure_future(asyncio.to_thread(self.generators.load_acquired, model_id, path))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(
                lambda t: (
                    None if t.cancelled() or t.exception() is not None else self.generators.release(model_id)
                )
            )
            raise

    async def _generator(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The caller checked, and the request's model loaded here and acquired (release it after)."""
        from rlhf_engine.chat.errors import ChatError

        token = self.generators.settings.inference_token
        if token and dict(context.invocation_metadata() or ()).get("x-worker-token") != token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this endpoint is for the API server only")
        generator = self.generators.try_acquire(request.model_id)
        if generator is None and self.generators.preparing(request.model_id, request.model_path):
            from rlhf_engine.chat.errors import ModelNotReadyError

            await _abort(
                context,
                ModelNotReadyError(
                    f"model {request.model_id} is being prepared (a bundled model, built "
                    "and pretrained on first use); retry in a few seconds",
                    param="model",
                ),
            )
        if generator is None:  # first request for the model here: load it off the event loop
            try:
                generator = await self._load_acquired(request.model_id, request.model_path)
            except ChatError as e:
                await _abort(context, e)
        return generator

    async def _adapter(self, generator: Any, request: Any, context: grpc.aio.ServicerContext) -> str | None:
        """The request's LoRA adapter, made resident on its base's generator (a few MB read once)."""
        from rlhf_engine.chat.errors import ChatError, ModelLoadError

        key = request.adapter_id
        if not key:
            return None
        if key not in generator.adapters:
            if not self.generators.inside_roots(request.adapter_path):
                await _abort(
                    context,
                    ModelLoadError(
                        f"model: {key} lies outside this worker's data and model roots", param="model"
                    ),
                )
            try:
                await asyncio.to_thread(generator.load_adapter, key, request.adapter_path)
            except ChatError as e:
                await _abort(context, e)
            await asyncio.to_thread(self.generators.on_change)  # routing prefers workers that hold it
        return str(key)

    async def _submit(
        self, generator: Any, request: Any, context: Any, submit: Any, *, off_loop: bool = False
    ) -> Any:
        """`submit(adapter)` with the request's adapter resident; loaded again if another request's adapter
        evicted it in between (a budget smaller than the adapters in use)."""
        from rlhf_engine.chat.errors import ModelLoadError, ModelNotReadyError

        for attempt in (1, 2):
            adapter = await self._adapter(generator, request, context)
            try:
                return await asyncio.to_thread(submit, adapter) if off_loop else submit(adapter)
            except ModelLoadError:
                if adapter is None or adapter in generator.adapters:
                    raise
                if attempt == 2:  # evicted twice by other requests' adapters: a moment's congestion
                    raise ModelNotReadyError(
                        f"model: adapter {adapter} was evicted while loading (more adapters in use than "
                        "RLHF_INFERENCE_ADAPTER_CACHE_MB holds); retry shortly",
                        param="model",
                    ) from None
        raise AssertionError("unreachable")

    async def Embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        from rlhf_engine.chat.errors import ChatError

        generator = await self._generator(request, context)
        try:
            inputs = list(request.texts) or [list(t.ids) for t in request.token_ids]
            future = None
            try:
                future = await self._submit(generator, request, context, lambda a: generator.embed(inputs, a))
                got = await asyncio.wrap_future(future)
            except ChatError as e:
                await _abort(context, e)
            except asyncio.CancelledError:  # the caller hung up: a queued job is dropped, a running one ends
                if future is not None:
                    future.cancel()
                raise
        finally:
            self.generators.release(request.model_id)
        return worker_pb2.EmbedReply(
            vectors=[
                worker_pb2.Vector(values=v, tokens=n) for v, n in zip(got.vectors, got.tokens, strict=True)
            ],
            worker_id=self.worker_id,
        )

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # noqa: N802
        from rlhf_engine.chat.errors import ChatError
        from rlhf_engine.config.chat import SamplingParams

        generator = await self._generator(request, context)
        handle: Any = None
        how = "failed"
        try:
            try:
                params = SamplingParams(
                    max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else None,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    stop=list(request.stop),
                    n=request.n or 1,
                    seed=request.seed if request.HasField("seed") else None,
                    grammar=request.grammar if request.HasField("grammar") else None,
                    logprobs=request.logprobs,
                    top_logprobs=request.top_logprobs,
                    logit_bias=dict(request.logit_bias),
                    presence_penalty=request.presence_penalty,
                    frequency_penalty=request.frequency_penalty,
                )
                messages = [_turn(m) for m in request.messages]
                tools = json.loads(request.tools) if request.tools else None
                options: dict[str, Any] = {"scope": request.cache_scope}
                if tools:
                    options |= {
                        "tools": tools,
                        "tool_choice": json.loads(request.tool_choice or '"auto"'),
                        "parallel_tool_calls": request.parallel_tool_calls,
                    }
                handle = await self._submit(
                    generator,
                    request,
                    context,
                    lambda a: generator.submit(messages, params, adapter=a, **options),
                    off_loop=sum(len(m["content"]) for m in messages) > 8192,  # long prompts tokenise off it
                )
            except ChatError as e:
                how = e.code
                await _abort(context, e)
                return
            yield worker_pb2.GenerateReply(
                started=worker_pb2.Started(prompt_tokens=len(handle.prompt_ids), worker_id=self.worker_id)
            )
            ends: list[str] = []
            how = "cancelled"  # until the stream ends: the caller hanging up cancels this task
            try:
                async for d in handle.aiter():
                    piece = worker_pb2.Piece(index=d.index, text=d.text, tokens=len(d.token_ids))
                    if d.finish_reason is not None:
                        piece.finish_reason = d.finish_reason
                        ends.append(d.finish_reason)
                    if d.reward is not None:
                        piece.reward = d.reward
                    if d.logprobs:
                        piece.logprobs.extend(_logprobs(generator, d.logprobs))
                    for c in d.tool_calls:
                        piece.tool_calls.add(id=c.id, name=c.name, arguments=c.arguments)
                    yield worker_pb2.GenerateReply(piece=piece)
            except ChatError as e:
                how = e.code
                await _abort(context, e)
                return
            how = ",".join(ends)
            usage = handle.usage
            yield worker_pb2.GenerateReply(
                finished=worker_pb2.Finished(
                    prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens
                )
            )
        finally:
            self.generators.release(request.model_id)
            if handle is not None:
                if how == "cancelled":
                    handle.cancel()
                ttft = (
                    (handle.first_token_at - handle.submitted) * 1e3
                    if handle.first_token_at
                    else float("nan")
                )
                logger.info(
                    "%s %s: %s; %d prompt + %d completion tokens; first token %.1f ms",
                    handle.id,
                    request.model_id,
                    how,
                    len(handle.prompt_ids),
                    handle.completion_tokens,
                    ttft,
                )


class Registration:
    """The worker's row in `inference_workers`, refreshed every heartbeat and on every load."""

    def __init__(self, settings: Settings, worker_id: str, address: str, generators: LoadedModels) -> None:
        self.settings, self.id, self.address, self.generators = settings, worker_id, address, generators
        self._lock = threading.Lock()

    def report(self) -> None:
        values = {
            "models": self.generators.ids(),
            "adapters": self.generators.adapter_ids(),
            "loading": self.generators.loading(),
            "active": self.generators.active(),
            "heartbeat_at": utcnow(),
        }
        with self._lock, session_scope(self.settings.db_url) as s:
            result: Any = s.execute(
                update(InferenceWorker).where(InferenceWorker.id == self.id).values(**values)
            )
            done = result.rowcount
            if not done:  # removed (or never written): register again
                s.add(
                    InferenceWorker(
                        id=self.id,
                        address=self.address,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        max_models=self.settings.inference_max_models,
                        capacity=self.settings.inference_capacity,
                        **values,
                    )
                )

    def report_quietly(self) -> None:
        try:
            self.report()
        except Exception:  # the database may be briefly away; the next heartbeat tries again
            logger.warning("heartbeat failed", exc_info=True)

    def remove(self) -> None:
        with session_scope(self.settings.db_url) as s:
            s.execute(delete(InferenceWorker).where(InferenceWorker.id == self.id))


def run_inference_worker(settings: Settings, *, port: int | None = None) -> int:
    from service.db.migrate import migrate

    if settings.inference_threads:  # before torch is imported: OpenMP reads it once
        os.environ["OMP_NUM_THREADS"] = str(settings.inference_threads)

    migrate(settings.db_url, timeout_s=settings.migrate_timeout_s)
    from workers.local import run_loop

    return run_loop(_serve(settings, port))


async def _serve(settings: Settings, port: int | None) -> int:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    worker_id = new_id("iw")
    generators = LoadedModels(settings)
    server = grpc.aio.server(
        maximum_concurrent_rpcs=settings.inference_capacity,
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],  # 2048 embeddings of a wide model
    )
    worker_pb2_grpc.add_InferenceWorkerServicer_to_server(InferenceServicer(worker_id, generators), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host = settings.inference_host
    bound = server.add_insecure_port(f"{host}:{settings.inference_port if port is None else port}")
    if not bound:
        raise ValueError(f"inference_port: cannot listen on {host}:{settings.inference_port}")
    advertise = (
        settings.inference_advertise
        or f"{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{bound}"
    )
    reg = Registration(settings, worker_id, advertise, generators)
    generators.on_change = reg.report_quietly
    await server.start()
    await asyncio.to_thread(reg.report)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "inference worker %s serving on %s (up to %d models, %d requests at once)",
        worker_id,
        advertise,
        settings.inference_max_models,
        settings.inference_capacity,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while True:  # bounded: serves until SIGTERM/SIGINT
            try:
                await asyncio.wait_for(stop.wait(), timeout=settings.inference_heartbeat_s)
                break
            except asyncio.TimeoutError:
                await asyncio.to_thread(reg.report_quietly)
    finally:
        await health_servicer.enter_graceful_shutdown()
        try:
            await asyncio.to_thread(reg.remove)  # no new requests routed here
        except Exception:
            logger.warning("could not remove the worker's registration", exc_info=True)
        await server.stop(grace=5.0)  # streams in flight get 5 s to finish
        await asyncio.to_thread(generators.close)
        logger.info("inference worker %s stopped", worker_id)
    return 0


def _turn(m: Any) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        turn["tool_call_id"] = m.tool_call_id
    return turn


def _logprobs(generator: Any, logprobs: list[Any]) -> list[Any]:
    """The engine's token log-probabilities with each token's text and bytes."""
    ids = sorted({lp.token for lp in logprobs} | {t for lp in logprobs for t, _ in lp.top})
    raw = dict(zip(ids, generator.token_bytes(ids), strict=True))

    def text(token: int) -> str:
        return raw[token].decode("utf-8", errors="replace")

    return [
        worker_pb2.TokenLogprob(
            token=text(lp.token),
            bytes=raw[lp.token],
            logprob=lp.logprob,
            top=[worker_pb2.TopLogprob(token=text(t), bytes=raw[t], logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
    ]
