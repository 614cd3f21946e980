"""Plain-transformers references the tests hold our engine's answers against."""

from __future__ import annotations


def mean_pooled(path: str, texts: list[str]) -> list[list[float]]:
    """Embeddings as `rlhf_engine.chat.embed` defines them, one text at a time (no padding): the mean of
    the causal LM's last hidden states, normalised."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1).tolist())
    return out


def decode(
    model: object,
    prompt: list[int],
    max_new: int,
    *,
    eos: set[int],
    temperature: float = 0.0,
    seed: int = 0,
    logit_bias: dict[int, float] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> tuple[list[int], list[object]]:
    """OpenAI's sampling controls written out on a plain transformers model, one full forward pass per
    token (no cache, no batch): logit_bias added, penalties subtracted (presence once per token in the
    reply, frequency per occurrence), then greedy or softmax(logits / temperature) drawn with a
    `torch.Generator` seeded `seed`. Returns the tokens and, per token, the model's log-softmax there."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    logps: list[object] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1].float()  # type: ignore[operator]
            logps.append(torch.log_softmax(logits, -1))
            for t, b in (logit_bias or {}).items():
                logits[t] += b
            counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.numel()).float()
            logits = logits - counts * frequency_penalty - (counts > 0).float() * presence_penalty
            if temperature == 0:
                token = int(torch.argmax(logits))
            else:
                token = int(
                    torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
                )
            tokens.append(token)
            if token in eos:
                break
    return tokens, logps
