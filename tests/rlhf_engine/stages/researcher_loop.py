"""The loop a researcher writes with the library (RLHFEngine + PPOTrainer over their own batches).

`python tests/rlhf_engine/stages/researcher_loop.py RUN`, RUN a finished `rlhf train` folder (its step1_sft
and step2_reward). Runs three batches; as a check that is not part of the loop, it compares the log-probs
taken from generate's logits with a forward pass's. Prints one JSON object as its last stdout line:
{"logprob_gaps": [gap per batch], "losses": [[actor_loss, critic_loss] per batch]}.
Run by tests/rlhf_engine/stages/test_ppo.py::test_the_researchers_loop_runs_as_written.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoTokenizer

from rlhf_engine import PPOConfig, PPOTrainer, RLHFEngine
from rlhf_engine.algorithms.ppo import token_logprobs
from rlhf_engine.data.collate import collate_prompts
from rlhf_engine.data.prepare import prepare_step
from rlhf_engine.runtime.generation import lm_logits


def main(argv: list[str] | None = None) -> None:
    [run] = sys.argv[1:] if argv is None else argv
    args = PPOConfig(
        actor_model_name_or_path=run + "/step1_sft",
        critic_model_name_or_path=run + "/step2_reward",
        per_device_generation_batch_size=4,
        per_device_training_batch_size=4,
        max_answer_len=16,
        actor_learning_rate=1e-4,
        critic_learning_rate=1e-4,
        num_warmup_steps=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.actor_model_name_or_path)
    prompts = prepare_step(args.data, 3, tokenizer).train
    loader = [
        collate_prompts([prompts.row(i) for i in range(j, j + 4)], tokenizer.pad_token_id)
        for j in range(0, 12, 4)
    ]

    engine = RLHFEngine(
        actor_model_name_or_path=args.actor_model_name_or_path,
        critic_model_name_or_path=args.critic_model_name_or_path,
        tokenizer=tokenizer,
        num_total_iters=len(loader),
        args=args,
    )
    trainer = PPOTrainer(engine=engine, args=args)
    gaps: list[float] = []
    losses: list[list[float]] = []
    for batch in loader:
        out = trainer.generate_experience(batch)
        # (a check, not part of the loop: the log-probs taken from generate's logits equal a forward pass's)
        with torch.no_grad():
            A = out.action_mask.shape[1]
            fwd = token_logprobs(
                lm_logits(engine.actor, out.seq, out.attention_mask, keep_last=A + 1)[:, :-1],
                out.seq[:, out.prompt_len :],
            )
        gaps.append(float(((fwd - out.logprobs).abs() * out.action_mask).max()))
        actor_loss, critic_loss = trainer.train_rlhf(out)
        losses.append([float(actor_loss), float(critic_loss)])
    print(json.dumps({"logprob_gaps": gaps, "losses": losses}))


if __name__ == "__main__":
    main()
