"""Per-step tokenisation, collators, counting of left-out rows, and the content-hash cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_engine.config.data import DataConfig
from rlhf_engine.data.collate import collate_pairs, collate_prompts, collate_sft
from rlhf_engine.data.errors import DataError
from rlhf_engine.data.prepare import prepare_corpus, prepare_step
from rlhf_engine.data.tokenize import Ragged, TokenizedSplit


def _rows(split: TokenizedSplit, n: int) -> list[dict]:
    return [split.row(i) for i in range(n)]


def test_step1_labels_cover_the_answer_only(tokenizer) -> None:
    prepared = prepare_step(DataConfig(), 1, tokenizer)
    batch = collate_sft(_rows(prepared.train, 8), tokenizer.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for i in range(8):
        row = prepared.train.row(i)
        n, p = len(row["input_ids"]), row["prompt_len"]
        assert (labels[i, :p] == -100).all()  # no loss on the prompt
        assert torch.equal(labels[i, p:n], ids[i, p:n])  # loss on every answer token, EOS included
        assert labels[i, n - 1] == tokenizer.eos_token_id
        assert (labels[i, n:] == -100).all() and (mask[i, n:] == 0).all()


def test_step2_pairs_and_step3_left_padding(tokenizer) -> None:
    pairs = prepare_step(DataConfig(), 2, tokenizer)
    b = collate_pairs(_rows(pairs.train, 4), tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 8  # chosen rows, then rejected rows
    for i in range(4):
        row = pairs.train.row(i)
        assert b["input_ids"][i, : len(row["chosen_ids"])].tolist() == row["chosen_ids"].tolist()
        assert b["input_ids"][4 + i, : len(row["rejected_ids"])].tolist() == row["rejected_ids"].tolist()
    prompts = prepare_step(DataConfig(), 3, tokenizer)
    b = collate_prompts(_rows(prompts.train, 16), tokenizer.pad_token_id)
    assert (b["attention_mask"][:, -1] == 1).all()  # every prompt ends in the last column
    assert (b["attention_mask"][:, 0] == 0).any()  # the shorter ones are padded on the left


def test_long_prompts_are_counted_never_silently_dropped(tokenizer) -> None:
    config = DataConfig(max_prompt_len=14, max_seq_len=24)
    for step in (1, 2, 3):
        prepared = prepare_step(config, step, tokenizer)
        for r in prepared.reports:
            for split in (r.train, r.eval):
                assert split["kept"] + sum(split["filtered"].values()) == split["rows"]
        total = sum(r.train["filtered"].get("prompt_too_long", 0) for r in prepared.reports)
        if step == 3:
            assert total > 0 and all(
                len(prepared.train.row(i)["prompt_ids"]) <= 14 for i in range(len(prepared.train))
            )
        else:
            assert sum(r.train["truncated"] for r in prepared.reports) > 0  # answers cut to 24 tokens
            col = "input_ids" if step == 1 else "chosen_ids"
            assert max(len(prepared.train.row(i)[col]) for i in range(len(prepared.train))) <= 24


def test_every_row_too_long_is_an_error_with_the_reason(tokenizer) -> None:
    with pytest.raises(DataError, match="prompt_too_long"):
        prepare_step(DataConfig(max_prompt_len=3), 3, tokenizer)


def test_identical_pairs_are_left_out(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "same" if i % 2 else "good", "rejected": "same"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_step(DataConfig(data=[str(path)], data_split="0,1,0", eval_fraction=0), 2, tokenizer)
    assert prepared.reports[0].train["filtered"] == {"identical_pair": 20} and len(prepared.train) == 20


def test_cache_returns_the_same_data_and_follows_every_input(tokenizer, fresh_cache: Path) -> None:
    config = DataConfig()
    fresh = prepare_step(config, 1, tokenizer, use_cache=False)
    first = prepare_step(config, 1, tokenizer)
    entries = list((fresh_cache / "tokenized").iterdir())
    assert len(entries) == 1
    again = prepare_step(config, 1, tokenizer)  # loaded from the entry just written
    for p in (first, again):
        ids, fresh_ids = p.train.columns["input_ids"], fresh.train.columns["input_ids"]
        assert isinstance(ids, Ragged) and isinstance(fresh_ids, Ragged)
        assert np.array_equal(ids.values, fresh_ids.values)
        prompt_len, fresh_prompt_len = p.train.columns["prompt_len"], fresh.train.columns["prompt_len"]
        assert isinstance(prompt_len, np.ndarray) and isinstance(fresh_prompt_len, np.ndarray)
        assert np.array_equal(prompt_len, fresh_prompt_len)
        assert p.report_dicts() == fresh.report_dicts()
    assert len(list((fresh_cache / "tokenized").iterdir())) == 1
    for changed in (DataConfig(seed=7), DataConfig(max_seq_len=30), DataConfig(data_split="3,4,3")):
        prepare_step(changed, 1, tokenizer)
    assert len(list((fresh_cache / "tokenized").iterdir())) == 4


def test_ragged_round_trip(tmp_path: Path) -> None:
    seqs = [[1, 2, 3], [], [4]]
    r = Ragged.from_lists(seqs)
    split = TokenizedSplit(3, {"prompt_ids": r, "n": np.array([3, 0, 1])})
    split.save(tmp_path / "s.npz")
    back = TokenizedSplit.load(tmp_path / "s.npz")
    assert [back.row(i)["prompt_ids"].tolist() for i in range(3)] == seqs
    assert [back.row(i)["n"] for i in range(3)] == [3, 0, 1] and back.step == 3


def test_corpus_blocks(tokenizer) -> None:
    blocks = prepare_corpus(DataConfig(), tokenizer, 64)
    assert blocks.ndim == 2 and blocks.shape[1] == 64 and blocks.shape[0] > 100
    assert tokenizer.eos_token_id in blocks  # documents are separated by EOS


def test_step3_rows_carry_their_item_through_the_cache(tokenizer, fresh_cache: Path) -> None:
    """A prompt row's other fields (what a grader reads) survive tokenisation and the .npz cache (no pickle),
    row for row with the prompts; rows without fields carry an empty item."""
    from rlhf_engine.data.readers import read_dataset
    from rlhf_engine.data.tokenize import decode_item

    config = DataConfig(data=["bundled:questions"], max_prompt_len=64)
    first = prepare_step(config, 3, tokenizer)
    cached = prepare_step(config, 3, tokenizer)
    rows = {r.conversation[-1].content: r.item for r in read_dataset("bundled:questions").rows}
    assert len(first.train) + len(first.eval) == 2000
    for split in (first.train, cached.train, cached.eval):
        for i in (0, len(split) // 2, len(split) - 1):
            row = split.row(i)
            prompt = tokenizer.decode(row["prompt_ids"])
            question = next(q for q in rows if q in prompt)
            assert decode_item(row["item"]) == rows[question]
    assert set(decode_item(cached.train.row(0)["item"])) == {"subject", "topic", "facts"}
    plain = prepare_step(DataConfig(data=["bundled:preference"], data_split="0,0,10"), 3, tokenizer)
    assert decode_item(plain.train.row(0)["item"]) == {}


def test_multi_turn_rows_train_each_assistant_turn_and_weight_0_turns_stay_context(tokenizer) -> None:
    """Labels cover exactly the assistant turns that train: both turns of an unweighted two-turn row; the
    first only when the last has weight 0; the last only when the first has."""
    from rlhf_engine.data.formatter import encode_answer, encode_prompt
    from rlhf_engine.data.tokenize import to_split, tokenize_rows
    from rlhf_engine.data.types import Message, Sample

    conv = (
        Message("user", "What color is the dog?"),
        Message("assistant", "Red."),
        Message("user", "And the cat?"),
    )
    both = Sample(conv, "Blue.", trained=(1,))
    first_only = Sample(conv, "Blue.", trained=(1,), answer_trained=False)
    last_only = Sample(conv, "Blue.")
    rows, stats = tokenize_rows(
        1, [both, first_only, last_only], tokenizer, max_seq_len=512, max_prompt_len=256
    )
    assert stats.kept == 3
    batch = collate_sft(_rows(to_split(1, rows), 3), tokenizer.pad_token_id)
    first = encode_answer(conv[:1], "Red.", tokenizer)
    first = first[:-1]  # this template ends no earlier turn with EOS, so that turn is trained without it
    start = len(encode_prompt(conv[:1], tokenizer))
    last = encode_answer(conv, "Blue.", tokenizer)
    prompt = len(encode_prompt(conv, tokenizer))

    def trained(i: int) -> list[int]:
        return [int(t) for t in batch["labels"][i] if t != -100]

    assert trained(0) == first + last
    assert trained(1) == first
    assert trained(2) == last
    assert batch["input_ids"][0, start : start + len(first)].tolist() == first
    assert batch["input_ids"][0, prompt : prompt + len(last)].tolist() == last


def test_a_validation_dataset_is_the_eval_split_and_nothing_is_held_out(tokenizer, tmp_path: Path) -> None:
    def sft(n: int, word: str) -> Path:
        path = tmp_path / f"{word}.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"{word} {i}?"},
                            {"role": "assistant", "content": f"{i}."},
                        ]
                    }
                )
                + "\n"
                for i in range(n)
            )
        )
        return path

    train, valid = sft(30, "train"), sft(7, "valid")
    held = prepare_step(DataConfig(data=[str(train)], data_split="10,0,0"), 1, tokenizer, use_cache=False)
    assert (len(held.train), len(held.eval)) == (27, 3)  # 10% held out of the training file
    config = DataConfig(data=[str(train)], data_split="10,0,0", eval_data=[str(valid)])
    prepared = prepare_step(config, 1, tokenizer, use_cache=False)
    assert (len(prepared.train), len(prepared.eval)) == (30, 7)
    texts = {tokenizer.decode(prepared.eval.row(i)["input_ids"]) for i in range(7)}
    assert all("valid" in t for t in texts)
