"""Which data each step reads, how it is split between the steps, and how long sequences may be."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_engine.data.bundled import DEFAULT_DATA, DEFAULT_UNSUP_DATA


def parse_split(text: str) -> tuple[float, float, float]:
    """ "2,4,4" → (0.2, 0.4, 0.4). Raises ValueError naming the field and the fix."""
    try:
        parts = [float(p) for p in str(text).split(",")]
    except ValueError:
        raise ValueError(f"data_split {text!r} must be three numbers such as 2,4,4") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(
            f"data_split {text!r} must be three non-negative numbers with a positive sum, one per step, "
            "such as 2,4,4 (DeepSpeed-Chat's default) or 10,0,0 for a supervised-only run"
        )
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


@dataclass
class DataConfig:
    data: list[str] = field(
        default_factory=lambda: list(DEFAULT_DATA),
        metadata={
            "help": "datasets: files (.jsonl/.json/.txt, optionally .gz), save_to_disk "
            "directories, bundled names (rlhf data list) or hub ids; blended"
        },
    )
    data_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "one weight per --data entry: how often its training rows appear (2 = twice, "
            "0.5 = a seeded half); default 1 each"
        },
    )
    data_split: str = field(
        default="2,4,4",
        metadata={
            "help": "shares of every dataset for steps 1,2,3 (disjoint, seeded); SFT-only data "
            "always goes to step 1"
        },
    )
    unsup_data: list[str] = field(
        default_factory=lambda: list(DEFAULT_UNSUP_DATA),
        metadata={"help": "plain-text corpus for step 3's pretraining mix (and tiny-model pretraining)"},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "share of each dataset held out for evaluation when it has no eval split"},
    )
    eval_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "validation datasets (OpenAI's validation_file): every step evaluates on their rows "
            "(preference rows serve every step, SFT rows step 1, prompts step 3) and nothing of data "
            "is held out"
        },
    )
    seed: int = field(default=1234, metadata={"help": "seed of the data split and shuffles"})
    max_seq_len: int = field(
        default=512, metadata={"help": "max tokens of prompt+answer in steps 1 and 2 (answers are cut)"}
    )
    max_prompt_len: int = field(
        default=256, metadata={"help": "max prompt tokens in step 3; longer prompts are left out and counted"}
    )
    max_file_bytes: int = field(
        default=4 << 30, metadata={"help": "cap on a data file's (decompressed) size"}
    )
    max_line_bytes: int = field(
        default=16 << 20, metadata={"help": "cap on one line / record of a data file"}
    )
    max_bad_rows: float = field(
        default=0.02,
        metadata={
            "help": "share of a file's rows that may be unusable: they are skipped and reported; above "
            "it the file is refused, naming the first such lines"
        },
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data: give at least one dataset, or omit it for the bundled data")
        if self.data_weights is not None:
            if len(self.data_weights) != len(self.data):
                raise ValueError(
                    f"data_weights has {len(self.data_weights)} values for {len(self.data)} datasets; "
                    "give one weight per --data entry"
                )
            if any(w <= 0 for w in self.data_weights):
                raise ValueError("data_weights must be positive; drop a dataset instead of weighting it 0")
        parse_split(self.data_split)
        if not 0.0 <= self.max_bad_rows < 1.0:
            raise ValueError(
                f"max_bad_rows {self.max_bad_rows} must be a share in [0, 1), e.g. 0.02 (2% of rows)"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction {self.eval_fraction} must be in [0, 1), e.g. 0.1")
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len {self.max_seq_len} is too small; use at least 8 (e.g. 512)")
        if self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len {self.max_prompt_len} must be at least 1 (e.g. 256)")
        if self.max_file_bytes < 1 or self.max_line_bytes < 1:
            raise ValueError("max_file_bytes and max_line_bytes must be positive")

    @property
    def shares(self) -> tuple[float, float, float]:
        return parse_split(self.data_split)

    def weight(self, index: int) -> float:
        return 1.0 if self.data_weights is None else self.data_weights[index]
