"""Loading a model to chat with: which directory, which weights, which backend.

Safe by default: `trust_remote_code` is off, and only safetensors weights load unless the operator
allows pickled ones (`allow_pickle`), because unpickling a file runs whatever code it holds.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_engine.chat.errors import ModelLoadError
from rlhf_engine.config.chat import ChatGeneratorConfig
from rlhf_engine.models.gguf import gguf_to_hf, is_gguf
from rlhf_engine.models.loading import HUB_ID, hub_snapshot

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Architectures DeepSpeed-Inference has injection policies for (checked on a GPU before relying on it).
INJECT_ARCHS = ("opt", "gpt2", "llama", "gptj", "gpt_neox", "bloom")
# One model loads at a time per process: transformers' from_pretrained is not thread-safe (an inference
# worker asked for a job's SFT, RLHF and EMA models at once failed with "Cannot copy out of meta tensor",
# or with a half-finished lazy import of transformers). Loads are CPU-bound anyway.
LOADING = threading.RLock()


@dataclass
class LoadedModel:
    model_dir: Path  # the causal LM directory
    run_dir: Path | None  # the training run it came from, if any
    reward_dir: Path | None  # that run's reward model, if it has one
    model: Any  # what generation calls: the HF model or DeepSpeed's InferenceEngine around it
    module: Any  # the HF model itself
    tokenizer: Any
    backend: str
    device: torch.device
    dtype: torch.dtype
    context_len: int
    eos_ids: frozenset[int]


def resolve_model_dir(path: str) -> tuple[Path, Path | None]:
    """(model directory, run directory or None) for a model directory or a training run directory."""
    if not path:
        raise ModelLoadError("model_path: give the model to chat with (--path DIR)", param="model_path")
    p = Path(path).expanduser()
    if not p.exists() and HUB_ID.fullmatch(path):  # a hub id: its snapshot in the Hugging Face cache
        try:
            p = Path(hub_snapshot(path, field="model_path"))
        except ValueError as e:
            raise ModelLoadError(str(e), param="model_path") from None
    if not p.exists():
        raise ModelLoadError(f"model_path: {path} does not exist", param="model_path")
    if p.is_file() and is_gguf(p):  # a llama.cpp file: dequantised once into a cached folder
        try:
            p = gguf_to_hf(p, field="model_path")
        except ValueError as e:
            raise ModelLoadError(str(e), param="model_path") from None
    if (p / "config.json").is_file():
        model_dir = p
    else:
        for sub in (
            "step3_rlhf/actor",
            "step2_dpo",
            "step1_sft",
        ):  # the run's chat model: RLHF, DPO, else SFT
            if (p / sub / "config.json").is_file():
                model_dir = p / sub
                break
        else:
            raise ModelLoadError(
                f"model_path: {path} holds no model: expected config.json, or a run directory with "
                "step3_rlhf/actor, step2_dpo or step1_sft",
                param="model_path",
            )
    model_dir = model_dir.resolve()
    run_dir = None
    if model_dir.parent.name == "step3_rlhf" and model_dir.name in ("actor", "actor_ema"):
        run_dir = model_dir.parent.parent
    elif model_dir.name in ("step1_sft", "step2_dpo"):
        run_dir = model_dir.parent
    return model_dir, run_dir


def check_weights(model_dir: Path, *, allow_pickle: bool) -> None:
    files = [f.name for f in model_dir.iterdir() if f.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if not pickled:
        raise ModelLoadError(f"model_path: {model_dir} has no weights (*.safetensors)", param="model_path")
    if not allow_pickle:
        raise ModelLoadError(
            f"model_path: {model_dir} holds only pickled weights ({', '.join(pickled)}), which can run "
            "code when loaded; convert them to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) or let the operator allow pickled "
            "weights (allow_pickle)",
            param="model_path",
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(
            f"device: {name!r} is not a device; use cpu, cuda or cuda:N", param="device"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device: CUDA is not available on this machine; use cpu", param="device")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the model computes in (int8: its linear layers' weights are int8, the rest this)."""
    if name == "int8":
        return pick_dtype("auto", device)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "fp16" and device.type == "cpu":
        raise ModelLoadError("dtype: fp16 is not supported on CPU; use fp32 or bf16", param="dtype")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pick_backend(config: ChatGeneratorConfig, device: torch.device) -> str:
    if config.kernel_inject and device.type != "cuda":
        raise ModelLoadError(
            "kernel_inject: DeepSpeed's inference kernels need CUDA; on CPU leave it off "
            "(deepspeed.init_inference then runs without injection)",
            param="kernel_inject",
        )
    if config.backend != "auto":
        return config.backend
    # On a CPU (bench/chat.py; docs/measurements/chat.md): the same module either way, and the plain
    # model skips DeepSpeed's import and wrapper, so transformers is the default; kernel injection
    # asks for DeepSpeed.
    return "deepspeed" if config.kernel_inject else "transformers"


def _context_len(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def load_chat_model(config: ChatGeneratorConfig) -> LoadedModel:
    with LOADING:
        return _load_chat_model(config)


def _load_chat_model(config: ChatGeneratorConfig) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from rlhf_engine.models.loading import load_config, load_tokenizer

    model_dir, run_dir = resolve_model_dir(config.model_path)
    check_weights(model_dir, allow_pickle=config.allow_pickle)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    backend = pick_backend(config, device)
    try:
        hf_config = load_config(str(model_dir), kind="causal_lm", field="model_path")
        tokenizer = load_tokenizer(str(model_dir), field="model_path")
    except ValueError as e:
        raise ModelLoadError(str(e), param="model_path") from None
    if config.dtype == "int8" and (backend != "transformers" or config.kernel_inject):
        raise ModelLoadError(
            "dtype: int8 weights decode on the transformers backend (torchao's int8 linear layers); "
            "use backend transformers, or dtype bf16 with DeepSpeed",
            param="dtype",
        )
    if config.kernel_inject and hf_config.model_type not in INJECT_ARCHS:
        raise ModelLoadError(
            f"kernel_inject: DeepSpeed has no injection policy for {hf_config.model_type}; "
            "leave kernel_inject off",
            param="kernel_inject",
        )
    if config.kernel_inject:
        from rlhf_engine.runtime.injection import injection_unsupported

        why = injection_unsupported()
        if why:
            raise ModelLoadError(
                f"kernel_inject: {why}; leave kernel_inject off (the deepspeed backend without "
                "injection gives the same tokens)",
                param="kernel_inject",
            )
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # a per-shard loading bar would land in the chat transcript
    try:
        module = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            config=hf_config,
            dtype=dtype,
            trust_remote_code=False,
            use_safetensors=None if config.allow_pickle else True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"model_path: cannot load {model_dir}: {e}", param="model_path") from None
    module = module.to(device).eval()  # type: ignore[arg-type]  # transformers types .to() oddly
    if config.dtype == "int8":
        int8_weights(module)
    model = module
    if backend == "deepspeed":
        import deepspeed

        model = deepspeed.init_inference(
            module, config={"dtype": dtype, "replace_with_kernel_inject": config.kernel_inject}
        )
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(module.generation_config, "eos_token_id", None)
    eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    reward_dir = None
    if run_dir is not None and config.score_replies and (run_dir / "step2_reward" / "config.json").is_file():
        reward_dir = run_dir / "step2_reward"
    logger.info("chat model %s (%s, %s, %s)", model_dir, backend, dtype, device)
    return LoadedModel(
        model_dir=model_dir,
        run_dir=run_dir,
        reward_dir=reward_dir,
        model=model,
        module=module,
        tokenizer=tokenizer,
        backend=backend,
        device=device,
        dtype=dtype,
        context_len=_context_len(hf_config),
        eos_ids=frozenset(e for e in eos if e is not None),
    )


def int8_weights(module: torch.nn.Module) -> None:
    """Weight-only int8 for every linear layer (per-channel scales; torchao's Int8WeightOnlyConfig):
    a quarter of fp32's bytes read per decoded token. The LM head included; embeddings stay."""
    try:
        logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only extensions fail to load here
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ModelLoadError("dtype: int8 needs torchao (pip install torchao)", param="dtype") from None
    quantize_(module, Int8WeightOnlyConfig())


class ReplyScorer:
    """Scores finished replies with a run's reward model, the way steps 2 and 3 score them."""

    def __init__(self, reward_dir: Path, device: torch.device) -> None:
        with LOADING:
            self._load(reward_dir, device)

    def _load(self, reward_dir: Path, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification

        from rlhf_engine.models.loading import load_tokenizer
        from rlhf_engine.models.value import ValueModel

        check_weights(reward_dir, allow_pickle=False)
        self.tokenizer = load_tokenizer(str(reward_dir), field="reward_model")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(reward_dir), trust_remote_code=False, use_safetensors=True
        )
        self.model = ValueModel(model.to(device).eval())
        self.device = device
        self.context_len = _context_len(model.config)

    @torch.no_grad()
    def score(self, messages: list[dict[str, str]], reply: str) -> float | None:
        from rlhf_engine.data.formatter import encode_answer, encode_prompt
        from rlhf_engine.models.value import sequence_scores

        ids = encode_prompt(messages, self.tokenizer) + encode_answer(messages, reply, self.tokenizer)
        ids = ids[-self.context_len :]
        input_ids = torch.tensor([ids], device=self.device)
        mask = torch.ones_like(input_ids)
        return float(sequence_scores(self.model(input_ids, mask), mask)[0])
