"""data_split and blending: disjoint seeded slices of every dataset, in proportion to the shares."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_engine.config.data import DataConfig, parse_split
from rlhf_engine.data.errors import DataError
from rlhf_engine.data.prepare import load_datasets, slice_all
from rlhf_engine.data.split import blend, bounds, require_rows


def _pref(path: Path, n: int, tag: str) -> str:
    path.write_text(
        "".join(json.dumps({"prompt": f"{tag} {i}", "chosen": "c", "rejected": "r"}) + "\n" for i in range(n))
    )
    return str(path)


def _sft(path: Path, n: int, tag: str) -> str:
    path.write_text("".join(json.dumps({"prompt": f"{tag} {i}", "response": "c"}) + "\n" for i in range(n)))
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {
        "a": _pref(tmp_path / "a.jsonl", 1000, "a"),
        "b": _pref(tmp_path / "b.jsonl", 300, "b"),
        "s": _sft(tmp_path / "s.jsonl", 200, "s"),
    }


def _prompts(rows) -> list[str]:
    return [r.prompt_text for r in rows]


def test_slices_are_disjoint_cover_everything_and_match_shares(files: dict[str, str]) -> None:
    config = DataConfig(data=[files["a"], files["b"]], data_split="2,4,4", eval_fraction=0.1)
    for ds, sl in zip(load_datasets(config), slice_all(config, load_datasets(config)), strict=True):
        parts = [_prompts(p) for p in sl.train + sl.eval]
        flat = [p for part in parts for p in part]
        assert len(flat) == len(set(flat)) == len(ds.rows)  # disjoint, nothing lost
        n_eval = round(len(ds.rows) * 0.1)
        assert sum(len(p) for p in sl.eval) == n_eval
        for i, share in enumerate((0.2, 0.4, 0.4)):
            assert abs(len(sl.train[i]) - share * (len(ds.rows) - n_eval)) <= 1
            assert abs(len(sl.eval[i]) - share * n_eval) <= 1


def test_same_seed_same_slices_other_seed_other_slices(files: dict[str, str]) -> None:
    def step_prompts(seed: int) -> list[list[str]]:
        config = DataConfig(data=[files["a"]], seed=seed)
        sl = slice_all(config, load_datasets(config))[0]
        return [_prompts(p) for p in sl.train]

    assert step_prompts(1) == step_prompts(1)
    assert step_prompts(1) != step_prompts(2)
    assert set(step_prompts(1)[0]) != set(step_prompts(2)[0])


def test_blending_keeps_every_datasets_rows_and_sft_stays_in_step_1(files: dict[str, str]) -> None:
    config = DataConfig(data=[files["a"], files["b"], files["s"]], data_split="2,4,4")
    datasets = load_datasets(config)
    slices = slice_all(config, datasets)
    sft = next(s for s in slices if s.kind == "sft")
    assert len(sft.train[0]) + len(sft.eval[0]) == 200 and not any(sft.train[1:]) and not any(sft.eval[1:])
    for step in (1, 2, 3):
        rows = blend([s.train[step - 1] for s in slices], [1.0, 1.0, 1.0], ["a", "b", "s"], step=step, seed=1)
        by_source = Counter(p.split()[0] for p in _prompts(rows))
        expected = {
            tag: len(s.train[step - 1]) for tag, s in zip("abs", slices, strict=True) if s.train[step - 1]
        }
        assert dict(by_source) == expected
        assert ("s" in by_source) == (step == 1)


def test_weights_repeat_or_sample_training_rows(files: dict[str, str]) -> None:
    config = DataConfig(data=[files["a"], files["b"]])
    slices = slice_all(config, load_datasets(config))
    rows = blend([s.train[1] for s in slices], [2.0, 0.5], ["a", "b"], step=2, seed=3)
    counts = Counter(p.split()[0] for p in _prompts(rows))
    assert counts["a"] == 2 * len(slices[0].train[1])
    assert counts["b"] == round(0.5 * len(slices[1].train[1]))


def test_a_step_that_needs_data_and_gets_none_is_an_error(files: dict[str, str], tmp_path: Path) -> None:
    config = DataConfig(data=[files["a"]], data_split="10,0,0")
    slices = slice_all(config, load_datasets(config))
    require_rows(1, slices, config.shares)
    with pytest.raises(DataError, match="data_split gives step 2 .* a zero share"):
        require_rows(2, slices, config.shares)
    only_sft = DataConfig(data=[files["s"]])
    with pytest.raises(DataError, match="needs preference data"):
        require_rows(2, slice_all(only_sft, load_datasets(only_sft)), only_sft.shares)
    with pytest.raises(DataError, match="needs prompts .* every dataset in data is SFT-only"):
        require_rows(3, slice_all(only_sft, load_datasets(only_sft)), only_sft.shares)
    # prompt-only data feeds step 3 whatever the shares, and cannot feed step 1
    prompts = DataConfig(data=["bundled:questions"], data_split="10,0,0")
    slices = slice_all(prompts, load_datasets(prompts))
    require_rows(3, slices, prompts.shares)
    assert len(slices[0].train[2]) + len(slices[0].eval[2]) == 2000
    assert not slices[0].train[0] and not slices[0].train[1]
    with pytest.raises(DataError, match="needs answers to train on.*prompts only"):
        require_rows(1, slices, prompts.shares)
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    text_cfg = DataConfig(data=[str(corpus)])
    with pytest.raises(DataError, match="unsup_data"):
        slice_all(text_cfg, load_datasets(text_cfg))


def test_source_eval_split_is_used_as_is(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": "c", "rejected": "r"} for i in range(50)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:40]), "test": datasets.Dataset.from_list(rows[40:])}
    ).save_to_disk(str(tmp_path / "d"))
    config = DataConfig(data=[str(tmp_path / "d")])
    sl = slice_all(config, load_datasets(config))[0]
    assert sorted(p for part in sl.eval for p in _prompts(part)) == sorted(f"q{i}" for i in range(40, 50))
    assert sum(len(p) for p in sl.train) == 40


@pytest.mark.parametrize("bad", ["2,4", "a,b,c", "-1,2,3", "0,0,0"])
def test_bad_split_strings(bad: str) -> None:
    with pytest.raises(ValueError, match="data_split"):
        DataConfig(data_split=bad)


@given(
    st.integers(min_value=0, max_value=5000),
    st.lists(st.integers(min_value=0, max_value=10), min_size=3, max_size=3).filter(lambda s: sum(s) > 0),
)
def test_bounds_partition_in_proportion(n: int, raw: list[int]) -> None:
    shares = parse_split(",".join(map(str, raw)))
    b = bounds(n, shares)
    assert b[0] == 0 and b[-1] == n and b == sorted(b)
    for i, s in enumerate(shares):
        assert abs((b[i + 1] - b[i]) - s * n) <= 1
