"""Run by test_zero3_two_processes_different_answer_lengths under torchrun (2 ranks, ZeRO-3).

Writes rank{R}.json with what it observed: parameter all-gathers per generate call for a short and a
long forced answer, parameter storage before and after the generation switch, engine build counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from rlhf_engine import PPOConfig, PPOTrainer, RLHFEngine
from rlhf_engine.data.collate import collate_prompts
from rlhf_engine.data.prepare import prepare_step

run, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])

inits: list[int] = []
_initialize = deepspeed.initialize


def counting_initialize(*a, **k):  # every engine must be built once, and only once
    inits.append(1)
    return _initialize(*a, **k)


deepspeed.initialize = counting_initialize

gathers = {"n": 0}
for name in ("all_gather_into_tensor", "all_gather", "_all_gather_base", "all_gather_coalesced"):
    if hasattr(dist, name):
        original = getattr(dist, name)

        def counting(*a, _f=original, **k):
            gathers["n"] += 1
            return _f(*a, **k)

        setattr(dist, name, counting)

zero3 = {"zero_stage": 3, "zero_param_persistence_threshold": 0, "dropout": 0.0}
args = PPOConfig(
    actor_model_name_or_path=run + "/step1_sft",
    critic_model_name_or_path=run + "/step2_reward",
    per_device_generation_batch_size=4,
    per_device_training_batch_size=4,
    max_answer_len=16,
    actor_learning_rate=1e-4,
    critic_learning_rate=1e-4,
    num_warmup_steps=0,
    actor=zero3,
    critic=zero3,
)
tok = AutoTokenizer.from_pretrained(args.actor_model_name_or_path)
prompts = prepare_step(args.data, 3, tok).train
batch = collate_prompts([prompts.row(i) for i in range(4 * rank, 4 * rank + 4)], tok.pad_token_id)
engine = RLHFEngine(
    actor_model_name_or_path=args.actor_model_name_or_path,
    critic_model_name_or_path=args.critic_model_name_or_path,
    tokenizer=tok,
    num_total_iters=4,
    args=args,
)
trainer = PPOTrainer(engine=engine, args=args)
params = list(engine.actor.module.parameters())


def storage() -> list[tuple[str, int, int]]:
    return [(p.ds_status.name, p.data.numel(), p.ds_tensor.numel()) for p in params]


before = storage()
lengths, counts = [], []
for n in (4, 12) if rank == 0 else (12, 4):  # the ranks generate different numbers of tokens, together
    trainer.generate_kwargs = {"min_new_tokens": n, "max_new_tokens": n}
    start = gathers["n"]
    seq = trainer._generate(batch["input_ids"], batch["attention_mask"])
    counts.append(gathers["n"] - start)
    lengths.append(seq.shape[1] - batch["input_ids"].shape[1])
after = storage()
# the plain path for contrast: ZeRO-3 gathers layer by layer for every token
# (synced_gpus keeps ranks together)
trainer.gather_for_generation = False
plain = []
for n in (4, 12) if rank == 0 else (12, 4):
    trainer.generate_kwargs = {"min_new_tokens": n, "max_new_tokens": n}
    start = gathers["n"]
    trainer._generate(batch["input_ids"], batch["attention_mask"])
    plain.append(gathers["n"] - start)
trainer.gather_for_generation = True
trainer.generate_kwargs = {"min_new_tokens": 4 + 4 * rank, "max_new_tokens": 4 + 4 * rank}
actor_loss, critic_loss = trainer.train_rlhf(trainer.generate_experience(batch))
short, long = (counts[0], counts[1]) if rank == 0 else (counts[1], counts[0])
plain_short, plain_long = (plain[0], plain[1]) if rank == 0 else (plain[1], plain[0])
(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "rank": rank,
            "answer_tokens": lengths,
            "gathers_short": short,
            "gathers_long": long,
            "plain_gathers_short": plain_short,
            "plain_gathers_long": plain_long,
            "parameters": len(params),
            "storage_before": before,
            "storage_after": after,
            "all_partitioned": all(s[0] == "NOT_AVAILABLE" for s in after),
            "init_counts": engine.init_counts,
            "initialize_calls": len(inits),
            "trained": bool(torch.isfinite(actor_loss) and torch.isfinite(critic_loss)),
        }
    )
)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
