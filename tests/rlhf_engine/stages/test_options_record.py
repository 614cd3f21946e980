"""A finished step and a checkpoint record the options they ran with; a later run with other options is
refused (it would not continue them). An option a newer version added is absent from older records: it
counts as changed only when it is off its default — so upgrading the service does not make every
finished step and every checkpoint of a running job stale."""

from __future__ import annotations

from rlhf_engine.config.train import SFTConfig
from rlhf_engine.stages.common import changed_options, fingerprint_of, option_defaults


def test_an_option_newer_than_a_record_changes_nothing_at_its_default() -> None:
    config = SFTConfig(model_name_or_path="m")
    now = fingerprint_of(config, 1)
    defaults = option_defaults(config)
    older = {k: v for k, v in now.items() if k != "gradient_clipping"}  # recorded before it existed
    older["data"] = {k: v for k, v in now["data"].items() if k != "max_bad_rows"}  # and a nested one
    assert changed_options(older, now, defaults) == []
    config.gradient_clipping, config.data.max_bad_rows = 0.3, 7  # now set off their defaults: changed
    assert changed_options(older, fingerprint_of(config, 1), defaults) == ["data", "gradient_clipping"]
    assert changed_options(now, fingerprint_of(SFTConfig(model_name_or_path="other"), 1), defaults) == [
        "model_name_or_path"
    ]
