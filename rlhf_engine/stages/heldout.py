"""How a chat model does on held-out questions of the bundled task: property rate, reward, KL.

    rlhf eval --model RUN/step3_rlhf/actor --reference RUN/step1_sft --reward-model RUN/step2_reward

Samples one answer per question (temperature 1, as PPO samples; fixed seed) for questions that no
bundled file holds, and reports: the share that is on topic (the bundled property, checked from the
words), the mean reward-model score, and the mean per-token KL to the reference model (nats).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_engine.algorithms.ppo import masked_mean, token_logprobs
from rlhf_engine.data.bundled import heldout_questions
from rlhf_engine.data.bundled.world import on_topic
from rlhf_engine.data.collate import pad
from rlhf_engine.data.formatter import encode_prompt
from rlhf_engine.models.value import ValueModel, sequence_scores
from rlhf_engine.runtime.generation import lm_logits
from rlhf_engine.stages.ppo_trainer import answer_mask


def _load(path: str, kind: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    architectures = config.architectures or []
    if kind == "rm" and not any(a.endswith("ForSequenceClassification") for a in architectures):
        # a causal LM would load with a new, random score head: refuse it by name
        raise ValueError(
            f"reward_model: {path} is {'/'.join(architectures) or 'a model'}, without a reward head, "
            "not a trained reward model; give step 2's output (RUN/step2_reward)"
        )
    cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(path, config=config, trust_remote_code=False).eval()


@torch.no_grad()
def heldout_report(
    model: str,
    *,
    reference: str,
    reward_model: str,
    n: int = 200,
    max_new_tokens: int = 32,
    batch_size: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Property rate, mean reward and mean KL of `model` on `n` held-out questions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    policy, ref = _load(model, "lm"), _load(reference, "lm")
    rm = ValueModel(_load(reward_model, "rm"))
    questions = heldout_questions()[:n]
    gen = torch.Generator().manual_seed(seed)
    hits = named = 0
    scores: list[float] = []
    kls: list[float] = []
    lengths: list[int] = []
    examples: list[dict[str, Any]] = []
    for i in range(0, len(questions), batch_size):
        batch = questions[i : i + batch_size]
        ids, mask = pad(
            [encode_prompt([{"role": "user", "content": q.text}], tok) for q in batch],
            tok.pad_token_id,
            left=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            seq = policy.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=tok.pad_token_id,
            )
        P = ids.shape[1]
        answers = seq[:, P:]
        am = answer_mask(answers, tok.eos_token_id)
        attn = torch.cat([mask, am], dim=1)
        scores += sequence_scores(rm(seq, attn), attn).tolist()
        A = answers.shape[1]
        lp = token_logprobs(lm_logits(policy, seq, attn, keep_last=A + 1)[:, :-1], answers)
        rlp = token_logprobs(lm_logits(ref, seq, attn, keep_last=A + 1)[:, :-1], answers)
        kls += masked_mean(lp - rlp, am.float(), dim=1).tolist()
        for q, a, m in zip(batch, answers, am, strict=True):
            text = str(tok.decode(a[m > 0], skip_special_tokens=True))
            hits += on_topic(q.text, text)
            named += q.subject in text.lower()
            lengths.append(int(m.sum()))
            if len(examples) < 5:
                examples.append(
                    {"prompt": q.text, "answer": text.strip(), "on_topic": on_topic(q.text, text)}
                )
    return {
        "questions": len(questions),
        "property_rate": hits / len(questions),
        "subject_rate": named / len(questions),  # answers that name the subject asked about (the grader task)
        "reward_mean": sum(scores) / len(scores),
        "kl_to_ref": sum(kls) / len(kls),
        "answer_len": sum(lengths) / len(lengths),
        "examples": examples,
    }
