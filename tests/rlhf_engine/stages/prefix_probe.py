"""Step 3's experience and training pass, with and without the shared prompt start
(rlhf_engine/runtime/prefix.py).

`python tests/rlhf_engine/stages/prefix_probe.py ACTOR CRITIC`: one batch of four bundled prompts, greedy,
made once left-padded and once from the shared start, then the policy's log-probs and gradients with
and without the start run once, then one training step. Prints one JSON object as its last stdout line:
  shared_columns          the shared start's length (columns)
  shared_columns_equal    whether those columns are the same in every row
  same_answers            whether both ways gave the same answers
  gaps                    largest absolute difference per name: logprobs, ref_logprobs, values, scores,
                          policy (the training pass's log-probs), and grads (relative to each
                          gradient's largest entry)
  start_once_in_training  whether the training pass runs the start once (no dropout, not ZeRO-3)
  grads                   [number of gradients without, with the shared start]
  losses                  [actor_loss, critic_loss] of the training step
Run by tests/rlhf_engine/stages/test_prefix.py::
test_ppo_experience_from_the_shared_start_equals_the_left_padded_one.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
from transformers import AutoTokenizer

from rlhf_engine import PPOConfig, PPOTrainer, RLHFEngine
from rlhf_engine.data.collate import collate_prompts
from rlhf_engine.data.prepare import prepare_step
from rlhf_engine.stages import ppo_trainer


def main(argv: list[str] | None = None) -> None:
    actor, critic = sys.argv[1:] if argv is None else argv
    args = PPOConfig(
        actor_model_name_or_path=actor,
        critic_model_name_or_path=critic,
        per_device_generation_batch_size=4,
        per_device_training_batch_size=4,
        max_answer_len=12,
        num_warmup_steps=0,
    )
    tok = AutoTokenizer.from_pretrained(actor)
    prompts = prepare_step(args.data, 3, tok).train
    batch = collate_prompts([prompts.row(i) for i in range(4)], tok.pad_token_id)
    engine = RLHFEngine(
        actor_model_name_or_path=actor,
        critic_model_name_or_path=critic,
        tokenizer=tok,
        num_total_iters=2,
        args=args,
    )
    trainer = PPOTrainer(engine=engine, args=args)
    trainer.generate_kwargs = {
        "do_sample": False,
        "min_new_tokens": 12,
    }  # greedy: the same answers either way
    runs = {}
    for share in (False, True):
        trainer.share_prompt_prefix = share
        runs[share] = trainer.generate_experience(batch)
    plain, shared = runs[False], runs[True]
    k = trainer._shareable_prefix(batch["input_ids"], batch["attention_mask"])
    P = plain.prompt_len
    result: dict[str, object] = {
        "shared_columns": int(k),
        "shared_columns_equal": bool((shared.seq[:, :k] == shared.seq[:1, :k]).all()),
        "same_answers": torch.equal(plain.seq[:, P:], shared.seq[:, P:]),
    }
    gaps = {
        name: float((getattr(plain, name) - getattr(shared, name)).abs().max())
        for name in ("logprobs", "ref_logprobs", "values", "scores")
    }
    # the training pass: the start run once gives the same log-probs and the same gradients
    module = engine.actor.module
    result["start_once_in_training"] = not (
        ppo_trainer._dropout(module) or ppo_trainer._zero_stage(engine.actor) == 3
    )
    engine.actor.train()
    got = {}
    for start in (0, shared.shared_prefix):
        module.zero_grad(set_to_none=True)
        lp = trainer.policy_logprobs(dataclasses.replace(shared, shared_prefix=start))
        engine.actor.backward((lp * shared.action_mask).sum())
        got[start] = (lp.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None])
    (lp0, g0), (lp1, g1) = got[0], got[shared.shared_prefix]
    gaps["policy"] = float((lp0 - lp1).abs().max())
    gaps["grads"] = max(
        float((a - b).abs().max() / a.abs().max().clamp(min=1e-12)) for a, b in zip(g0, g1, strict=False)
    )
    result["gaps"] = gaps
    result["grads"] = [len(g0), len(g1)]
    module.zero_grad(set_to_none=True)
    actor_loss, critic_loss = trainer.train_rlhf(shared)
    result["losses"] = [float(actor_loss), float(critic_loss)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
