"""Two "nodes" DeepSpeed-Chat's way: `--hostfile` with two host names, DeepSpeed's multi-node runner
fanning out over pdsh and ssh (an sshd on this machine with a key the fixture makes,
tests/helpers/ssh_nodes.py), one rank on each "node" — the code path a cluster without a scheduler
takes, on one machine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_engine.runtime.launch import NODE_ENV_FILE, first_host
from rlhf_engine.stages.records import read_jsonl
from tests.helpers import ssh_nodes
from tests.runs import FAST, rlhf, rlhf_ok


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ssh_nodes.Nodes]:
    n = ssh_nodes.start(tmp_path_factory.mktemp("ssh"))
    yield n
    n.stop()


@pytest.fixture(scope="module")
def llama() -> Path:
    """A tiny Llama (rotary, RMSNorm, gated MLP): the family real checkpoints come from."""
    from rlhf_engine.models.tiny import build_tiny

    return build_tiny("llama", "xs")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_over_two_hostfile_nodes_equals_one_process(
    nodes: ssh_nodes.Nodes, tmp_path: Path, llama: Path
) -> None:
    common = [
        "--model",
        llama,
        "--dropout",
        0,
        "--max-steps",
        6,
        "--zero-stage",
        3,
        "--zero-param-persistence-threshold",
        0,
        *FAST,
        "--checkpoint-interval",  # (the last flag wins): a checkpoint written across nodes
        3,
    ]
    rlhf_ok("sft", "--output-dir", tmp_path / "one", "--gradient-accumulation-steps", 2, *common)
    two = rlhf(
        "sft",
        "--output-dir",
        tmp_path / "two",
        "--gradient-accumulation-steps",
        1,
        "--hostfile",
        nodes.hostfile,
        *common,
        timeout=480,
    )
    out = two.stdout + two.stderr
    assert two.returncode == 0, out[-3000:]
    step = tmp_path / "two" / "step1_sft"
    # pdsh ran one launcher on each host name, the ranks 0 and 1 of one world
    for name in nodes.names:
        assert f"{name}:" in out, out[-3000:]
    summary = json.loads((step / "summary.json").read_text())
    assert summary["processes"] == 2
    # the step's environment reached the other "node" through DeepSpeed's env file (the fencing token,
    # the CPU accelerator, offline flags)
    exported = (step / NODE_ENV_FILE).read_text()
    assert "DS_ACCELERATOR=cpu" in exported and "HF_HUB_OFFLINE=1" in exported
    assert "RLHF_WATCH_PID" not in exported  # a pid on this host means nothing on another
    one_losses = [m["loss"] for m in read_jsonl(tmp_path / "one" / "step1_sft" / "metrics.jsonl")]
    two_losses = [m["loss"] for m in read_jsonl(step / "metrics.jsonl")]
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    w1 = load_file(str(tmp_path / "one" / "step1_sft" / "model.safetensors"))
    w2 = load_file(str(step / "model.safetensors"))
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4
    assert [p.name for p in (step / "checkpoints").iterdir()], "no checkpoint written across nodes"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mpirun_over_a_hostfile_as_kubeflow_trainer_launches_it(
    nodes: ssh_nodes.Nodes, tmp_path: Path, llama: Path
) -> None:
    """The launch a Kubernetes TrainJob's launcher pod makes (Trainer's DeepSpeed runtime: OpenMPI over
    /etc/mpi/hostfile, workers/kube.py): `--launcher mpirun --nodes 2`, one rank per "node", each rank's
    variables from OpenMPI's. MASTER_ADDR is given here: these host names exist for ssh only (in a
    TrainJob the hostfile's names resolve, and the first one is the default)."""
    assert first_host(str(nodes.hostfile)) == nodes.names[0]
    out_dir = tmp_path / "mpi"
    done = rlhf(
        "sft",
        "--output-dir",
        out_dir,
        "--model",
        llama,
        "--max-steps",
        4,
        "--zero-stage",
        3,
        *FAST,
        "--num-gpus",
        1,
        "--nodes",
        2,
        "--launcher",
        "mpirun",
        "--hostfile",
        nodes.hostfile,
        timeout=480,
        env={
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "MASTER_ADDR": "127.0.0.1",
        },
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summary = json.loads((out_dir / "step1_sft" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_steps"] == 4
