"""GGUF files refused clearly from their header, before any weight is read: a quantisation the gguf
package cannot dequantise, an architecture transformers cannot read from GGUF, a file that is not GGUF.
(The real file — SmolLM2's Q4_1 GGUF — is converted and used in tests/rlhf_engine/test_smollm2.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlhf_engine.models.gguf import check_gguf, gguf_to_hf
from rlhf_engine.models.loading import resolve_model


def _gguf(path: Path, *, arch: str, qtype: str) -> Path:
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    _, size = gguf.GGML_QUANT_SIZES[kind]  # (values per block, bytes per block)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((1, size), dtype=np.uint8), raw_dtype=kind)  # one block
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_quantisation_that_cannot_be_dequantised_is_refused_naming_it(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf", arch="llama", qtype="Q8_K")
    with pytest.raises(
        ValueError, match=r"actor_model_name_or_path: .*m.gguf holds tensors quantised as Q8_K.*llama.cpp"
    ):
        resolve_model(str(path), field="actor_model_name_or_path")
    assert check_gguf(_gguf(tmp_path / "ok.gguf", arch="llama", qtype="Q4_1"))["tensor_types"] == ["Q4_1"]


def test_an_architecture_transformers_cannot_read_and_a_non_gguf_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"is a 'rwkv9' GGUF model; transformers reads GGUF files of .*llama"
    ):
        gguf_to_hf(_gguf(tmp_path / "r.gguf", arch="rwkv9", qtype="Q8_0"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        resolve_model(str(fake))
