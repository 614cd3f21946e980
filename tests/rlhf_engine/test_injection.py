"""DeepSpeed's kernel injection is refused up front where the installed transformers cannot run it
(measured on an H200: DeepSpeed 0.19.8's injected layers break under transformers 5)."""

from __future__ import annotations

import types

import pytest
import transformers

from rlhf_engine.config.ppo import PPOConfig
from rlhf_engine.runtime.engines import check_hybrid_engine
from rlhf_engine.runtime.injection import injection_unsupported

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the refusal is for transformers 5")
def test_hybrid_engine_is_refused_with_transformers_5_before_anything_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU on this machine: CUDA is reported available (a mock) so the check after that one is reached.
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    why = injection_unsupported()
    assert why is not None and transformers.__version__ in why
    with pytest.raises(
        ValueError, match=r"enable_hybrid_engine: DeepSpeed .* does not support transformers 5"
    ):
        check_hybrid_engine(
            PPOConfig(actor_model_name_or_path="a", critic_model_name_or_path="c", enable_hybrid_engine=True),
            types.SimpleNamespace(model_type="opt"),
        )
