"""Multi-node for real on one machine: two network namespaces joined by a veth pair.

Each namespace is a "node" with its own network stack and one address on the veth link
(10.231.77.1 and .2, inside the namespaces only: the host's interfaces and routes are not
touched). One torchrun launcher per node, `--nnodes 2 --node_rank i --master_addr 10.231.77.1`,
trains the tiny recipe on CPU (gloo) over that link, so node rank, master address and a world
size spanning both nodes are exercised exactly as on two machines.

Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) for `ip netns`; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clipa_ds.data.synthetic import write_synthetic_shards

MASTER_ADDR = "10.231.77.1"
NODE_ADDRS = ("10.231.77.1/24", "10.231.77.2/24")
PRETRAIN_SAMPLES, FINETUNE_SAMPLES, GLOBAL_BATCH = 1024, 512, 256


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_unavailable() -> str | None:
    """The reason this machine cannot create network namespaces, or None if it can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"clipaprobe{os.getpid()}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _create_nodes(names: tuple[str, str], veths: tuple[str, str]) -> None:
    for ns in names:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    # Create the pair inside the first namespace, then move its peer: nothing lands on the host.
    _ip("-n", names[0], "link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
    _ip("-n", names[0], "link", "set", veths[1], "netns", names[1])
    for ns, veth, addr in zip(names, veths, NODE_ADDRS):
        _ip("-n", ns, "addr", "add", addr, "dev", veth)
        _ip("-n", ns, "link", "set", veth, "up")


def _launcher(ns: str, veth: str, node_rank: int, port: int, run_dir: Path, shards: str) -> list[str]:
    return [
        "ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={veth}",
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
        "--master_addr", MASTER_ADDR, "--master_port", str(port),
        "-m", "clipa_ds.train", "tiny",
        f"run.dir={run_dir}", "run.tensorboard=false", "run.log_every_steps=1",
        f"data.train_urls={shards}", "data.workers=0",
        f"stages.pretrain.samples={PRETRAIN_SAMPLES}", "stages.pretrain.optim.warmup_samples=256",
        f"stages.pretrain.global_batch={GLOBAL_BATCH}", f"stages.finetune.global_batch={GLOBAL_BATCH}",
        f"stages.finetune.samples={FINETUNE_SAMPLES}", "stages.finetune.optim.warmup_samples=256",
    ]


@pytest.mark.slow
def test_two_node_job_across_network_namespaces(tmp_path: Path, port: int) -> None:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = str(os.getpid())[-6:]
    names = (f"clipa{tag}n0", f"clipa{tag}n1")
    veths = (f"cv{tag}a", f"cv{tag}b")
    shard_paths = write_synthetic_shards(
        tmp_path / "shards", num_samples=2048, samples_per_shard=256, image_size=48, seed=0
    )
    shards = "::".join(shard_paths)
    run_dirs = (tmp_path / "node0", tmp_path / "node1")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen[str]] = []
    try:
        _create_nodes(names, veths)
        for rank in (0, 1):
            log = open(tmp_path / f"node{rank}.log", "w")
            procs.append(subprocess.Popen(
                _launcher(names[rank], veths[rank], rank, port, run_dirs[rank], shards),
                env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            ))
        codes = [p.wait(timeout=600) for p in procs]
        logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
        assert codes == [0, 0], "\n\n".join(f"--- node {r} (exit {c})\n{log[-4000:]}" for r, (c, log) in enumerate(zip(codes, logs)))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for ns in names:
            _ip("netns", "del", ns, check=False)  # removes the veth pair with it
    # Global rank 0 lives on node 0: only it writes metrics. Node 1's process ran as global
    # rank 1 of a 2-process world (it wrote nothing), which is only possible after the two
    # launchers met over the veth link.
    assert not (run_dirs[1] / "metrics.jsonl").exists()
    records = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "event" not in r]  # stage_start / eval events
    last = {r["stage"]: r for r in records}
    assert last["pretrain"]["samples_seen"] == PRETRAIN_SAMPLES
    assert last["finetune"]["samples_seen"] == FINETUNE_SAMPLES
    assert len(records) == (PRETRAIN_SAMPLES + FINETUNE_SAMPLES) // GLOBAL_BATCH
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN
    assert not any(ns in _ip("netns", "list").stdout for ns in names)
