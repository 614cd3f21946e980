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
