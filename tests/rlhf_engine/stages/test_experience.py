"""The experience helpers: where an answer ends, what counts as degenerate, mini-batches."""

from __future__ import annotations

import torch

from rlhf_engine.stages.ppo_trainer import Experience, answer_mask, degenerate_rows

EOS, PAD = 0, 1


def test_answer_mask_ends_at_the_first_eos_inclusive() -> None:
    answers = torch.tensor(
        [[5, 6, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 6, 7, 8, 9], [5, EOS, 6, EOS, PAD]]
    )
    assert answer_mask(answers, EOS).tolist() == [
        [1, 1, 1, 0, 0],  # the EOS is an action too: it is what ends the answer
        [1, 0, 0, 0, 0],  # an empty answer still has its EOS
        [1, 1, 1, 1, 1],  # cut by max_answer_len: every token counts
        [1, 1, 0, 0, 0],  # whatever follows the first EOS is not part of the answer
    ]


def test_degenerate_rows() -> None:
    answers = torch.tensor(
        [
            [EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],  # empty
            [7, 7, 7, 7, 7, 7, 7, 7, 9, EOS],  # one token repeated: 8 of 9
            [5, 6, 7, 8, 9, 10, 11, 12, 13, EOS],  # fine
            [7, 7, 7, EOS, PAD, PAD, PAD, PAD, PAD, PAD],  # short repetition is not flagged (e.g. "no no no")
        ]
    )
    mask = answer_mask(answers, EOS)
    assert degenerate_rows(answers, mask, EOS).tolist() == [True, True, False, False]


def test_experience_splits_into_mini_batches_row_aligned() -> None:
    B, P, A = 5, 3, 4
    exp = Experience(
        seq=torch.arange(B * (P + A)).view(B, P + A),
        attention_mask=torch.ones(B, P + A),
        prompt_len=P,
        action_mask=torch.ones(B, A),
        logprobs=torch.randn(B, A),
        ref_logprobs=torch.randn(B, A),
        values=torch.randn(B, A),
        scores=torch.arange(B).float(),
        degenerate=torch.zeros(B, dtype=torch.bool),
    )
    parts = exp.split(2)
    assert [len(p) for p in parts] == [2, 2, 1] and all(p.prompt_len == P for p in parts)
    assert torch.equal(torch.cat([p.scores for p in parts]), exp.scores)
    assert torch.equal(torch.cat([p.seq for p in parts]), exp.seq)
