"""How the training worker tells a slow step from a stalled one (workers/watch.py), with the clock
passed in: no test waits for a bound to run out."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_engine.stages import phase
from workers.watch import PhaseWatch, bound_s

FLOOR, FACTOR = 300.0, 5.0


def _report(step_dir: Path, **values: object) -> None:
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / phase.PHASE_FILE).write_text(json.dumps({"process_started": 1000.0, "beat": 1000.0} | values))


def test_a_phase_may_go_without_progress_for_a_multiple_of_its_usual_time_never_under_the_floor() -> None:
    assert bound_s(45.0, floor_s=FLOOR, factor=FACTOR) == 300.0  # 225 s would be under the floor
    assert bound_s(120.0, floor_s=FLOOR, factor=FACTOR) == 600.0
    assert bound_s(None, floor_s=FLOOR, factor=FACTOR) == 300.0  # nothing says what is usual: the floor


def test_before_the_first_report_the_step_is_starting(tmp_path: Path) -> None:
    watch = PhaseWatch(tmp_path, started=1000.0, floor_s=FLOOR, factor=FACTOR)
    seen = watch.read()
    assert (seen.name, seen.since, seen.bound_s) == ("starting", 1000.0, 300.0)
    assert watch.stalled(seen, now=1299.0) is None
    said = watch.stalled(seen, now=1301.0)
    assert said == "stalled while starting the step for 301 s (bound 300 s; the step never reported)"
    _report(tmp_path, phase="training", since=900.0, process_started=900.0)  # an earlier attempt's report
    assert watch.read().name == "starting"


def test_a_stalled_phase_is_named_with_its_time_and_bound(tmp_path: Path) -> None:
    watch = PhaseWatch(tmp_path, started=1000.0, floor_s=FLOOR, factor=FACTOR)
    _report(
        tmp_path,
        phase="building_ops",
        label="building DeepSpeed ops",
        since=1005.0,
        progress_at=1005.0,
        typical_s=90.0,
        beat=1900.0,
    )
    seen = watch.read()
    assert seen.bound_s == 450.0 and seen.public(1)["name"] == "building_ops"
    assert watch.stalled(seen, now=1455.0) is None
    assert watch.stalled(seen, now=1901.0) == (
        "stalled while building DeepSpeed ops for 896 s "
        "(bound 450 s; the process is alive but makes no progress)"
    )
    _report(
        tmp_path,
        phase="training",
        label="training step 7 of 40",
        since=1005.0,
        progress_at=1010.0,
        typical_s=2.0,
        beat=1011.0,
    )
    assert watch.stalled(watch.read(), now=1400.0) == (
        "stalled while training step 7 of 40 for 390 s (bound 300 s; no sign of life for 389 s)"
    )


def test_progress_inside_a_phase_keeps_it_alive(tmp_path: Path) -> None:
    watch = PhaseWatch(tmp_path, started=1000.0, floor_s=FLOOR, factor=FACTOR)
    _report(tmp_path, phase="tokenizing", since=1001.0, progress_at=1700.0, beat=1700.0)
    assert watch.stalled(watch.read(), now=1900.0) is None  # 15 minutes in, but rows still coming
