"""The `rlhf data` commands as a user runs them: output they can read, errors they can act on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def rlhf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlhf_engine.cli", *args], capture_output=True, text=True)


def test_preview_reports_rows_filters_and_lengths_per_dataset_and_step(tokenizer_dir: Path) -> None:
    done = rlhf("data", "preview", "--tokenizer", str(tokenizer_dir), "--max-prompt-len", "14", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    by = {(r["step"], r["dataset"]): r for r in out["steps"]}
    assert set(by) == {(s, d) for s in (1, 2, 3) for d in ("bundled:sft", "bundled:preference")}
    assert by[(1, "bundled:sft")]["train"]["rows"] == 3600 and by[(2, "bundled:sft")]["train"]["rows"] == 0
    step3 = by[(3, "bundled:preference")]["train"]
    assert step3["filtered"]["prompt_too_long"] > 0 and step3["tokens_max"] <= 14
    assert step3["kept"] + step3["filtered"]["prompt_too_long"] == step3["rows"] == 1440
    assert step3["tokens_min"] <= step3["tokens_median"] <= step3["tokens_max"]
    assert out["unsup"]["blocks"] > 0
    assert {e["step"] for e in out["examples"]} == {1, 2, 3}
    assert out["examples"][1]["prompt"].startswith(" Human: ") and "rejected" in out["examples"][1]


def test_preview_human_output(tokenizer_dir: Path) -> None:
    done = rlhf("data", "preview", "--tokenizer", str(tokenizer_dir), "--steps", "2")
    assert done.returncode == 0, done.stderr
    assert "bundled:preference" in done.stdout and "1440/1440" in done.stdout


def test_bad_data_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    cases = [
        (["--data", str(bad)], f"{bad}, line 2, field 'rejected'"),
        (["--data-split", "1,2"], "data_split"),
        (["--data", "bundled:sft", "--data-weights", "1", "2"], "one weight per --data entry"),
        (
            ["--data", "bundled:sft", "--steps", "2", "--no-unsup"],
            "",
        ),  # SFT-only for step 2: reported, not fatal
        (["--tokenizer", str(tmp_path / "nope")], "tokenizer"),
    ]
    for args, message in cases:
        done = rlhf("data", "preview", *args)
        assert "Traceback" not in done.stderr, done.stderr
        if message:
            assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        else:
            assert done.returncode == 0, done.stderr


def test_config_file_supplies_options_and_flags_override(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data_split: 10,0,0\nseed: 5\n")
    done = rlhf(
        "data",
        "preview",
        "--config",
        str(cfg),
        "--tokenizer",
        str(tokenizer_dir),
        "--seed",
        "6",
        "--json",
        "--no-unsup",
        "--steps",
        "1",
    )
    out = json.loads(done.stdout)
    assert out["split"] == "10,0,0" and out["seed"] == 6
    cfg.write_text("data_splitt: 1,1,1\n")
    done = rlhf("data", "preview", "--config", str(cfg))
    assert done.returncode == 2 and "unknown option(s) ['data_splitt']" in done.stderr


def test_config_file_values_are_type_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "step.yaml"
    for text, message in (
        ("zero_stage: three\n", "zero_stage must be int"),
        ("dtype: fp8\n", "dtype must be one of"),
        ("data_split: [1, 2]\n", "data_split must be str"),
        ("- just\n- a list\n", "must hold a mapping"),
    ):
        cfg.write_text(text)
        done = rlhf("sft", "--model", "x", "--config", str(cfg))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
