"""The bundled tokenizer: a byte-level BPE trained here, with `tokenizers`, on the bundled text.

Byte-level means every Unicode string encodes (no unknown token) and decodes back unchanged.
Training is deterministic: the same text gives the same `tokenizer.json` byte for byte.

Saved so that transformers 4.x and 5.x both load it: transformers 5's `save_pretrained` writes
`tokenizer_class: TokenizersBackend` (unknown to 4.x) and moves the chat template into a separate
`chat_template.jinja` (ignored by older 4.x), so we write `tokenizer_config.json` ourselves with
`PreTrainedTokenizerFast` and the template inline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rlhf_engine.data.bundled import GENERATOR_VERSION, bundled_path
from rlhf_engine.data.formatter import DS_CHAT_TEMPLATE
from rlhf_engine.paths import cache_dir

TOKENIZER_VERSION = "v1"  # bump when training or saving changes
EOS = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 512


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE with EOS (id 0) and PAD (id 1) as special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(
    tok: Tokenizer,
    out: Path,
    *,
    chat_template: str = DS_CHAT_TEMPLATE,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in (EOS, PAD)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# the files the tokenizer was trained on (bundled:questions, added later, has the same words: adding
# it would change every token id and so every cached model)
TRAINED_ON = ("bundled:sft", "bundled:preference", "bundled:corpus")


def _bundled_texts() -> Iterable[str]:
    for name in TRAINED_ON:
        path = bundled_path(name)
        if path.suffix == ".txt":
            yield from path.read_text(encoding="utf-8").split("\n\n")
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                # rendered the way training sees it, so " Human:" / " Assistant:" become tokens too
                yield (
                    " Human: "
                    + row["prompt"]
                    + " Assistant: "
                    + " ".join(row[k] for k in ("response", "chosen", "rejected") if k in row)
                )


def bundled_tokenizer_dir(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """The bundled tokenizer's folder, trained on first use and cached."""
    dest = cache_dir("tokenizers") / f"bundled-{GENERATOR_VERSION}-{TOKENIZER_VERSION}-{vocab_size}"
    if (dest / "tokenizer_config.json").is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    save_tokenizer(train_bpe(_bundled_texts(), vocab_size), tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
