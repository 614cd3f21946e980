"""The PPO trainer: make experience with the actor, learn from it (DeepSpeed-Chat's step-3 core).

    trainer = PPOTrainer(engine=engine, args=args)
    for batch in loader:                       # left-padded prompts: {"input_ids", "attention_mask"}
        out = trainer.generate_experience(batch)
        actor_loss, critic_loss = trainer.train_rlhf(out)

`generate_experience` samples answers (the actor's own engine in generation mode), then scores every
sequence once with each model: actor and reference log-probabilities of the answer tokens, critic
values, reward-model score. `train_rlhf` turns them into KL-penalised rewards and GAE advantages and
takes one clipped policy step and one clipped value step (the math is in `algorithms/ppo.py`).

With `algorithm` grpo or rloo there is no critic: each prompt gets `samples_per_prompt` answers (its
group, consecutive rows), every answer's advantage is its reward against its group's
(`algorithms/group.py`), the same for each of its tokens, and `train_rlhf` takes the clipped policy
step alone — with kl_ctl × the k3 KL estimate added to the loss when `kl_in` is loss (else the KL sum
is taken off the reward, as PPO does).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import LogitsProcessorList

from rlhf_engine import graders, judging
from rlhf_engine.algorithms.group import grpo_advantages, informative_groups, kl_k3, rloo_advantages
from rlhf_engine.algorithms.losses import lm_loss
from rlhf_engine.algorithms.ppo import (
    gae,
    kl_penalized_rewards,
    masked_mean,
    mean_kl,
    policy_loss,
    token_logprobs,
    value_loss,
)
from rlhf_engine.chat.structured import GrammarProcessor, Vocabulary, grammar_of
from rlhf_engine.models.loading import DROPOUT_KEYS
from rlhf_engine.models.value import sequence_scores
from rlhf_engine.runtime.engines import RLHFEngine, as_ppo_config
from rlhf_engine.runtime.generation import cache_kwarg, generation_mode, lm_logits, needs_synced_gpus
from rlhf_engine.runtime.kv_cache import reserved_cache
from rlhf_engine.runtime.prefix import has_sliding_layers, prefix_cache, prefix_first, shared_prefix_len

logger = logging.getLogger(__name__)

REPEAT_MIN_TOKENS = 8
MIN_SHARED_PREFIX = 8  # shorter shared starts are not worth the extra pass
REPEAT_SHARE = 0.6


@dataclass
class Experience:
    """One batch of sampled answers and everything PPO needs about them.

    seq (B, L) = left-padded prompt (P columns) + answer (A = L − P columns); answer-aligned tensors
    are (B, A); `action_mask` is 1 on answer tokens up to and including EOS.
    """

    seq: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    degenerate: torch.Tensor  # (B,) bool: empty or one token repeated
    gen_seconds: float = 0.0
    score_seconds: float = 0.0
    advantages: torch.Tensor | None = None  # (B,) grpo/rloo: each answer's advantage within its group
    weights: torch.Tensor | None = None  # (B,) grpo/rloo: 0 for answers of a filtered group
    grades: list[dict[str, float]] | None = None  # with a grader: each answer's score per named part
    grade_notes: list[dict[str, Any]] | None = (
        None  # with a grader: each answer's error flags, judges' replies
    )
    shared_prefix: int = 0  # the first columns every row holds alike (engine/prefix.py), 0: left-padded

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def split(self, size: int) -> list[Experience]:
        """Mini-batches of `size` rows (DeepSpeed-Chat's MiniDataset)."""
        out = []
        for i in range(0, len(self), size):
            parts = {f.name: getattr(self, f.name) for f in fields(self)}
            for k, v in parts.items():
                if isinstance(v, torch.Tensor | list):
                    parts[k] = v[i : i + size]
            out.append(Experience(**parts))
        return out

    @property
    def answer_lengths(self) -> torch.Tensor:
        return self.action_mask.sum(1)


def answer_mask(answers: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on answer tokens up to and including the first EOS, 0 after it: (B, A)."""
    is_eos = (answers == eos_id).long()
    before_or_at_eos = (is_eos.cumsum(1) - is_eos) == 0
    return before_or_at_eos.long()


def degenerate_rows(answers: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B,) True for an empty answer or one where a single token makes up most of a long answer."""
    out = []
    for row, m in zip(answers, mask, strict=True):
        tokens = row[(m > 0) & (row != eos_id)]
        if len(tokens) == 0:
            out.append(True)
            continue
        top = int(torch.bincount(tokens).max())
        out.append(len(tokens) >= REPEAT_MIN_TOKENS and top / len(tokens) >= REPEAT_SHARE)
    return torch.tensor(out, dtype=torch.bool)


def _dropout(module: Any) -> bool:
    """Whether a training pass of the model drops anything (then rows' shared starts differ)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules()):
        return True
    config = getattr(module, "config", None)
    return any(isinstance(v := getattr(config, key, None), float) and v > 0 for key in DROPOUT_KEYS)


def _zero_stage(model: Any) -> int:
    stage = getattr(model, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        ids = batch.get("input_ids", batch.get("prompt"))
        mask = batch.get("attention_mask", batch.get("prompt_att_mask"))
    else:
        ids, mask = batch[0], batch[1]
    if ids is None or mask is None:
        raise ValueError("a prompt batch needs input_ids and attention_mask (left-padded prompts)")
    return ids, mask


class PPOTrainer:
    """generate_experience / train_rlhf / train_unsupervised over an RLHFEngine."""

    def __init__(self, engine: RLHFEngine, args: Any = None) -> None:
        self.engine = engine
        self.args = as_ppo_config(args if args is not None else engine.args)
        self.tokenizer = engine.tokenizer
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.pad_id = int(
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        )
        self.device = engine.dist.device
        self.use_ds_hybrid = self.args.enable_hybrid_engine
        self.gather_for_generation = True
        self.reserve_kv_cache = True  # False: Hugging Face's default cache (the bench's baseline)
        self.share_prompt_prefix = True  # run the prompts' shared start once (engine/prefix.py)
        self.warnings: list[str] = []  # for the caller to turn into events
        self.generate_kwargs: dict[str, Any] = {}  # extra arguments for `generate` (e.g. min_new_tokens)
        self.last_metrics: dict[str, float] = {}
        self.grader = self.args.parsed_grader()
        self.judge = judging.from_environment()  # model graders' judges, through the service
        self.embed = judging.embedder_from_environment()  # cosine similarity's embedding model, likewise
        self.grammar = (  # answers sampled under the job's response_format (constrained decoding)
            grammar_of(json.loads(self.args.response_format)) if self.args.response_format else None
        )
        self._grammar_vocab: Vocabulary | None = None

    # ------------------------------------------------------------------ experience

    def _generate(self, prompts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._generate_with_logits(prompts, mask, keep_logits=False)[0]

    def _shareable_prefix(self, prompts: torch.Tensor, mask: torch.Tensor) -> int:
        """Tokens all prompts start with, to run once (0: off, too few, or a case prefix.py excludes)."""
        if not self.share_prompt_prefix or self.use_ds_hybrid:
            return 0
        models = [self.engine.actor, self.engine.ref]
        if any(has_sliding_layers(getattr(m, "module", m).config) for m in models):
            return 0
        if self.engine.dist.world_size > 1 and any(_zero_stage(m) == 3 for m in models):
            return 0  # ranks must run the same forward passes
        k = shared_prefix_len(prompts, mask)
        return k if k >= MIN_SHARED_PREFIX else 0

    def _generate_with_logits(
        self, prompts: torch.Tensor, mask: torch.Tensor, *, keep_logits: bool, prefix: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sequences (B, P + A), raw next-token logits of the answer positions (B, A, V) or None).
        `prefix` = k: the prompts are laid out by `prefix_first` and their first k columns run once."""
        cfg = self.args
        kwargs: dict[str, Any] = {
            "attention_mask": mask,
            "max_new_tokens": cfg.max_answer_len,
            "do_sample": True,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": cfg.top_k,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_id,
            "use_cache": True,
            **self.generate_kwargs,
        }
        actor = self.engine.actor
        with torch.no_grad():
            if self.use_ds_hybrid:  # DeepSpeed's HybridEngine (CUDA): its own inference kernels
                actor.eval()
                out = actor.generate(prompts, synced_gpus=self.engine.dist.world_size > 1, **kwargs)
                actor.train()
                return out, None
            if self.grammar is not None:
                kwargs["logits_processor"] = LogitsProcessorList(
                    [GrammarProcessor(self._vocabulary(), self.grammar, len(prompts), self.eos_id)]
                )
            synced = needs_synced_gpus(
                actor, gather=self.gather_for_generation, world_size=self.engine.dist.world_size
            )
            if keep_logits:  # the raw (untempered) logits of every sampled position
                kwargs |= {"return_dict_in_generate": True, "output_logits": True}
            with generation_mode(actor, gather=self.gather_for_generation) as model:
                reserve = cfg.max_answer_len + (prompts.shape[1] - prefix if prefix else 0)
                cache = reserved_cache(model, reserve) if self.reserve_kv_cache else None  # written in place
                if prefix:
                    cache = prefix_cache(model, prompts[0, :prefix], len(prompts), cache)
                if cache is not None:
                    kwargs[cache_kwarg(model)] = cache
                out = model.generate(prompts, synced_gpus=synced, **kwargs)
        if not keep_logits:
            return out, None
        return out.sequences, torch.stack(out.logits, dim=1)  # (B, A, V)

    def _vocabulary(self) -> Vocabulary:
        if self._grammar_vocab is None:
            actor = getattr(self.engine.actor, "module", self.engine.actor)
            self._grammar_vocab = Vocabulary(self.tokenizer, actor, {self.eos_id})
        return self._grammar_vocab

    @torch.no_grad()
    def generate_experience(
        self,
        batch: Any,
        step: int | None = None,
        *,
        samples: int | None = None,
        items: list[dict[str, Any]] | None = None,
    ) -> Experience:
        """Sample answers for a batch of left-padded prompts and score them with every model
        (`samples` answers per prompt: default samples_per_prompt; evaluation samples 1). With a
        grader, `items` are the prompts' rows (what its templates read)."""
        prompts, prompt_mask = (t.to(self.device) for t in _unpack(batch))
        group = samples or self.args.samples_per_prompt
        if self.grader is not None:
            if items is None or len(items) != len(prompts):
                raise ValueError("a grader needs each prompt's item (its row's fields)")
            items = [it for it in items for _ in range(group)]
        if group > 1:  # each prompt's answers are consecutive rows: its group
            prompts, prompt_mask = (
                prompts.repeat_interleave(group, 0),
                prompt_mask.repeat_interleave(group, 0),
            )
        t0 = time.monotonic()
        reuse = self.args.reuse_generation_logits and not self.use_ds_hybrid
        if shared := self._shareable_prefix(prompts, prompt_mask):
            prompts, prompt_mask = prefix_first(prompts, prompt_mask, shared, self.pad_id)
        seq, gen_logits = self._generate_with_logits(prompts, prompt_mask, keep_logits=reuse, prefix=shared)
        gen_s = time.monotonic() - t0
        P = prompts.shape[1]
        if (
            seq.shape[1] == P
        ):  # every row ended at once (max_answer_len reached 0 new tokens?) — keep shapes sane
            seq = torch.cat([seq, torch.full_like(seq[:, :1], self.eos_id)], dim=1)
        answers = seq[:, P:]
        action_mask = answer_mask(answers, self.eos_id)
        degenerate = degenerate_rows(answers.cpu(), action_mask.cpu(), self.eos_id)
        if self.use_ds_hybrid and float(degenerate.float().mean()) > self.args.degenerate_threshold:
            self.use_ds_hybrid = False
            self.warnings.append(
                f"{int(degenerate.sum())}/{len(degenerate)} answers from DeepSpeed's hybrid engine "
                "were empty or repetitive; generation falls back to the plain path"
            )
        attn = torch.cat([prompt_mask, action_mask], dim=1)
        t1 = time.monotonic()
        A = answers.shape[1]
        if gen_logits is not None and gen_logits.shape[1] == A:
            logprobs = token_logprobs(gen_logits, answers)  # no second actor pass
        else:
            logprobs = token_logprobs(
                lm_logits(self.engine.actor, seq, attn, keep_last=A + 1)[:, :-1], answers
            )
        ref_cache = prefix_cache(self.engine.ref, seq[0, :shared], len(seq)) if shared else None
        ref_logits = lm_logits(self.engine.ref, seq, attn, keep_last=A + 1, cache=ref_cache, cached=shared)
        ref_logprobs = token_logprobs(ref_logits[:, :-1], answers)
        if self.engine.critic is not None:
            values = self.engine.critic(seq, attn)[:, P - 1 : -1]  # V(state before each answer token)
        else:
            values = torch.zeros_like(logprobs)
        grades = notes = None
        if self.grader is not None:
            scores, grades, notes = self.grade(seq, attn, answers, action_mask, items or [])
        else:
            scores = sequence_scores(self.engine.reward(seq, attn), attn)
        exp = Experience(
            seq,
            attn,
            P,
            action_mask,
            logprobs,
            ref_logprobs,
            values,
            scores,
            degenerate,
            gen_seconds=gen_s,
            score_seconds=time.monotonic() - t1,
            grades=grades,
            grade_notes=notes,
            shared_prefix=shared,
        )
        if self.args.algorithm != "ppo" and group > 1:
            exp.advantages, exp.weights = self.group_advantages(exp)
        return exp

    @torch.no_grad()
    def grade(
        self,
        seq: torch.Tensor,
        attn: torch.Tensor,
        answers: torch.Tensor,
        action_mask: torch.Tensor,
        items: list[dict[str, Any]],
    ) -> tuple[torch.Tensor, list[dict[str, float]], list[dict[str, Any]]]:
        """The grader's reward per answer (B,), each answer's score per named part, and its notes (error
        flags, the judges' replies).

        The answer text is what a chat client would see: decoded without special tokens, stripped.
        score_model parts with a reward model read the whole sequence with it, once per batch; judges are
        asked and python runs in its sandbox once per batch too. A sample that cannot be graded scores 0
        with its error flag: the step goes on."""
        assert self.grader is not None
        model_scores = {
            name: sequence_scores(model(seq, attn), attn).tolist()
            for name, model in self.engine.score_models.items()
        }
        texts = [
            str(self.tokenizer.decode(ids[mask > 0], skip_special_tokens=True)).strip()
            for ids, mask in zip(answers, action_mask, strict=True)
        ]
        context = graders.Context(value_scores=model_scores.__getitem__, judge=self.judge, embed=self.embed)
        graded = graders.grade_batch(self.grader, texts, items, context)
        rewards = [g.score for g in graded]
        notes = [{"errors": g.errors, "judges": g.replies} for g in graded]
        return torch.tensor(rewards, dtype=torch.float32, device=seq.device), [g.parts for g in graded], notes

    @torch.no_grad()
    def group_advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantage per answer (B,), loss weight per answer (B,)) from the rewards of each group."""
        cfg = self.args
        mask = exp.action_mask.float()
        rewards = exp.scores.float().clamp(-cfg.clip_reward_value, cfg.clip_reward_value)
        if cfg.kl_in == "reward":  # the KL penalty PPO spreads over the tokens, as one sum per answer
            rewards = rewards - cfg.kl_ctl * ((exp.logprobs - exp.ref_logprobs) * mask).sum(1)
        grouped = rewards.view(-1, cfg.samples_per_prompt)
        adv = grpo_advantages(grouped) if cfg.algorithm == "grpo" else rloo_advantages(grouped)
        keep = (
            informative_groups(grouped) if cfg.filter_groups else torch.ones(len(grouped), dtype=torch.bool)
        )
        weights = keep.to(rewards.device).float().repeat_interleave(cfg.samples_per_prompt)
        return adv.reshape(-1), weights

    # ------------------------------------------------------------------ learning

    def policy_logprobs(self, exp: Experience) -> torch.Tensor:
        """The actor's log-probs of the answers (B, A), with gradients. The rows' shared start
        (`exp.shared_prefix`) runs once and its keys/values serve every row: the same values and the
        same gradients (a broadcast's gradient is the sum over rows), where the start's activations
        are the same in every row — no dropout, no gradient checkpointing (which drops the cache),
        and no ZeRO-3 partitioning (one forward per backward there)."""
        actor = self.engine.actor
        A = exp.action_mask.shape[1]
        k = exp.shared_prefix
        module = getattr(actor, "module", actor)
        if k and (
            _zero_stage(actor) == 3 or getattr(module, "is_gradient_checkpointing", False) or _dropout(module)
        ):
            k = 0
        cache = prefix_cache(actor, exp.seq[0, :k], len(exp.seq)) if k else None
        logits = lm_logits(actor, exp.seq, exp.attention_mask, keep_last=A + 1, cache=cache, cached=k)[:, :-1]
        return token_logprobs(logits, exp.seq[:, exp.prompt_len :])

    def train_rlhf(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """One clipped policy step and one clipped value step on `exp`; returns (actor_loss, critic_loss)."""
        if exp.advantages is not None:
            return self.train_group(exp)
        cfg = self.args
        mask = exp.action_mask.float()
        advantages, returns = self.advantages(exp)
        actor = self.engine.actor
        actor.train()
        logprobs = self.policy_logprobs(exp)
        actor_loss, clipfrac = policy_loss(logprobs, exp.logprobs, advantages, mask, cliprange=cfg.cliprange)
        actor.backward(actor_loss)
        stepped = actor.is_gradient_accumulation_boundary()
        actor.step()
        if stepped:
            self.engine.update_ema()
        critic_loss, value_clipfrac = self.critic_step(exp, returns)
        self.last_metrics = {
            "actor_loss": float(actor_loss.detach()),
            "critic_loss": float(critic_loss.detach()),
            "clip_frac": float(clipfrac),
            "value_clip_frac": float(value_clipfrac),
            "advantage_mean": float(masked_mean(advantages, mask)),
            "return_mean": float(masked_mean(returns, mask)),
        }
        return actor_loss.detach(), critic_loss.detach()

    def train_group(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """GRPO/RLOO: one clipped policy step with the group advantages (no critic); (actor_loss, 0)."""
        cfg = self.args
        assert exp.advantages is not None and exp.weights is not None
        mask = exp.action_mask.float() * exp.weights.unsqueeze(1)
        advantages = exp.advantages.unsqueeze(1).expand_as(mask)
        actor = self.engine.actor
        actor.train()
        logprobs = self.policy_logprobs(exp)
        if mask.sum() > 0:
            actor_loss, clipfrac = policy_loss(
                logprobs, exp.logprobs, advantages, mask, cliprange=cfg.cliprange
            )
            kl_loss = masked_mean(kl_k3(logprobs, exp.ref_logprobs), mask)
        else:
            # every group of this micro-batch was filtered out: a step that changes nothing
            # (ZeRO-3 stays in step)
            actor_loss, clipfrac, kl_loss = (logprobs * 0).sum(), torch.zeros(()), (logprobs * 0).sum()
        if cfg.kl_in == "loss":
            actor_loss = actor_loss + cfg.kl_ctl * kl_loss
        actor.backward(actor_loss)
        stepped = actor.is_gradient_accumulation_boundary()
        actor.step()
        if stepped:
            self.engine.update_ema()
        self.last_metrics = {
            "actor_loss": float(actor_loss.detach()),
            "clip_frac": float(clipfrac),
            "kl_loss": float(kl_loss.detach()),
            "advantage_mean": float(masked_mean(advantages, mask)) if mask.sum() > 0 else 0.0,
        }
        zero = torch.zeros(())
        return actor_loss.detach(), zero

    @torch.no_grad()
    def advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns) of `exp`: GAE over the KL-penalised per-token rewards."""
        cfg = self.args
        mask = exp.action_mask.float()
        rewards = kl_penalized_rewards(
            exp.logprobs,
            exp.ref_logprobs,
            exp.scores,
            mask,
            kl_ctl=cfg.kl_ctl,
            clip_reward_value=cfg.clip_reward_value,
        )
        return gae(exp.values, rewards, mask, gamma=cfg.gamma, lam=cfg.lam)

    def critic_step(self, exp: Experience, returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One clipped value step towards `returns`; (critic_loss, value clip fraction)."""
        critic = self.engine.critic
        critic.train()
        values = critic(exp.seq, exp.attention_mask)[:, exp.prompt_len - 1 : -1]
        loss, clipfrac = value_loss(
            values, exp.values, returns, exp.action_mask.float(), cliprange_value=self.args.cliprange_value
        )
        critic.backward(loss)
        critic.step()
        return loss, clipfrac

    def train_unsupervised(self, input_ids: torch.Tensor, unsup_coef: float) -> torch.Tensor:
        """PPO-ptx: one actor step on unsup_coef × the LM loss of plain-text blocks; returns the LM loss."""
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids)
        actor = self.engine.actor
        actor.train()
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        loss = lm_loss(actor(**kwargs).logits, ids)
        actor.backward(unsup_coef * loss)
        stepped = actor.is_gradient_accumulation_boundary()
        actor.step()
        if stepped:
            self.engine.update_ema()
        return loss.detach()

    def train_rlhf_with_unsupervised(
        self, exp: Experience, unsup_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """train_rlhf, then the mixture step (InstructGPT's PPO-ptx).

        Returns (actor_loss, critic_loss, unsup_loss).
        """
        actor_loss, critic_loss = self.train_rlhf(exp)
        return actor_loss, critic_loss, self.train_unsupervised(unsup_ids, self.args.unsup_coef)

    # ------------------------------------------------------------------ metrics of one experience

    def experience_metrics(self, exp: Experience) -> dict[str, float]:
        mask = exp.action_mask.float()
        out = {
            "reward_mean": float(exp.scores.mean()),
            "kl_to_ref": float(mean_kl(exp.logprobs, exp.ref_logprobs, mask)),
            "answer_len": float(exp.answer_lengths.float().mean()),
            "degenerate_rate": float(exp.degenerate.float().mean()),
        }
        if exp.weights is not None:  # grpo/rloo: the share of answers whose group was filtered out
            out["filtered_rate"] = float(1 - exp.weights.float().mean())
        grades = exp.grades or []
        for name in grades[0] if grades else ():  # each named part of the grader, averaged
            out[f"grader_{name}"] = float(sum(g[name] for g in grades)) / len(grades)
        if exp.grade_notes:  # the share of answers the grader could not grade (scored 0 with a flag)
            failed = sum(1 for n in exp.grade_notes if n["errors"])
            out["grader_error_rate"] = failed / len(exp.grade_notes)
        return out


def sequence_kl(exp: Experience) -> torch.Tensor:
    """Per-row mean KL to the reference over the answer tokens: (B,)."""
    return masked_mean(exp.logprobs - exp.ref_logprobs, exp.action_mask.float(), dim=1)
