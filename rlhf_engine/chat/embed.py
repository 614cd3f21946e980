"""Embeddings from a served causal LM: the mean of the last layer's hidden states over the input's
tokens, L2-normalised (sentence-transformers' mean pooling; vLLM's pooling of decoder models for
`/v1/embeddings`). Any chat model we serve embeds this way; the chat generator runs it on its scheduler
thread between decode steps (torch on one thread), `/v1/embeddings` and the `cosine` grader ask for it.

The text is tokenised as it is (the tokenizer's own special tokens, no chat template), so the same
text gives the same vector whoever asks and whatever conversation it came from."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_engine.chat.errors import ChatRequestError, ContextLengthExceededError

MAX_INPUTS = 2048  # OpenAI's limit per request
BATCH_ROWS = 32
BATCH_TOKENS = 8192  # padded tokens per forward pass


@dataclass
class Embeddings:
    vectors: list[list[float]]  # one unit vector per input, in order
    tokens: list[int]  # each input's token count


@dataclass
class EmbedJob:
    """Inputs tokenised and checked, waiting for the scheduler thread; `future` gets `Embeddings`."""

    token_ids: list[list[int]]
    adapter: str | None = None  # a resident LoRA adapter every input runs through
    future: concurrent.futures.Future[Embeddings] = field(default_factory=concurrent.futures.Future)


def token_ids(
    inputs: Sequence[str | Sequence[int]], tokenizer: Any, *, context_len: int, vocab_size: int
) -> list[list[int]]:
    """Each input as token ids: a string tokenised, a list of ids taken as given. Empty inputs, ids
    outside the vocabulary and inputs longer than the model's context are `ChatRequestError`s naming
    `input[i]`."""
    if not inputs:
        raise ChatRequestError("input: give at least one text to embed", param="input")
    if len(inputs) > MAX_INPUTS:
        raise ChatRequestError(
            f"input: {len(inputs)} inputs, at most {MAX_INPUTS} per request; split it", param="input"
        )
    out = []
    for i, item in enumerate(inputs):
        where = f"input[{i}]" if len(inputs) > 1 else "input"
        if isinstance(item, str):
            ids = list(tokenizer(item, add_special_tokens=True)["input_ids"]) if item else []
            if not item:
                raise ChatRequestError(f"{where}: an empty string cannot be embedded", param=where)
        else:
            ids = [int(t) for t in item]
            if not ids:
                raise ChatRequestError(f"{where}: an empty list of tokens cannot be embedded", param=where)
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ChatRequestError(
                    f"{where}: token id {bad} is outside the model's vocabulary (0…{vocab_size - 1})",
                    param=where,
                )
        if len(ids) > context_len:
            raise ContextLengthExceededError(
                f"{where}: {len(ids)} tokens, above the model's context of {context_len}; shorten it",
                param=where,
                prompt_tokens=len(ids),
                context_len=context_len,
            )
        out.append(ids)
    return out


def hidden_model(module: Any) -> Any:
    """The causal LM's decoder without its LM head (`LlamaForCausalLM.model`, `OPTForCausalLM.model`, …)."""
    base = getattr(module, "base_model", module)
    return base if base is not module else None


@torch.no_grad()
def embed_ids(module: Any, device: torch.device, ids: list[list[int]], pad_id: int) -> Embeddings:
    """Mean-pooled, normalised last hidden states of each input, in batches of similar lengths."""
    decoder = hidden_model(module)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    vectors: list[list[float]] = [[] for _ in ids]
    start = 0
    while start < len(order):
        end = start + 1
        while (
            end < len(order)
            and end - start < BATCH_ROWS
            and (end - start + 1) * len(ids[order[end]]) <= BATCH_TOKENS
        ):
            end += 1
        rows = [ids[i] for i in order[start:end]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        if decoder is not None:
            hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        else:
            out = module(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
        weights = mask.unsqueeze(-1).to(torch.float32)
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1)
        for i, v in zip(order[start:end], F.normalize(pooled, dim=-1).cpu().tolist(), strict=True):
            vectors[i] = v
        start = end
    return Embeddings(vectors=vectors, tokens=[len(r) for r in ids])
