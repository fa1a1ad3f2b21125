"""The deployment recipes in deploy/: documented, well-formed, and accepted by the tools that read them."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import ssl
import subprocess
from pathlib import Path

import dask.config
import distributed
import pytest
from distributed import Client, LocalCluster
from distributed.security import Security

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SCRIPTS = sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def restore_dask_config():
    """Put dask's config back as it was (dva_slurm.load_config merges into it globally)."""
    pytest.importorskip("dask_jobqueue")  # imported first: importing adds its defaults to the config
    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)


def test_readme_names_every_file():
    readme = (DEPLOY / "README.md").read_text()
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts]
    assert len(files) >= 10
    missing = [str(p.relative_to(DEPLOY)) for p in files if f"deploy/{p.relative_to(DEPLOY)}" not in readme]
    assert not missing, f"deploy/README.md does not mention {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shell_scripts_parse(script: Path):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _dva_slurm():
    pytest.importorskip("dask_jobqueue")
    spec = importlib.util.spec_from_file_location("dva_slurm", DEPLOY / "slurm" / "dva_slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobqueue_renders_a_gpu_worker_job(restore_dask_config):
    dva_slurm = _dva_slurm()
    with dva_slurm.make_cluster(scheduler_options={"dashboard_address": ":0", "host": "127.0.0.1"}) as cluster:
        script = cluster.job_script()
        address = cluster.scheduler_address
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines
    assert "#SBATCH --cpus-per-task=8" in lines
    assert "#SBATCH --mem=64G" in lines
    (command,) = [line for line in lines if " -m dask cuda worker " in line]
    assert f"dask cuda worker {address} " in command
    assert "--nthreads 1 " in command
    assert "--memory-limit 64.00GiB" in command
    assert "--nworkers" not in command and "--nanny" not in command  # options of `dask worker` only


def test_jobqueue_dry_run_prints_the_dva_command(restore_dask_config, capsys):
    dva_slurm = _dva_slurm()
    args = ["--jobs", "2", "--dry-run", "run", "store.zarr", "--mask", "mask.mrc", "--filter-res", "8"]
    assert dva_slurm.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("dva run store.zarr --mask mask.mrc --filter-res 8 --scheduler tcp://")
    assert "#SBATCH --gres=gpu:1" in out


def _containers(pod_spec: dict) -> dict:
    return {c["name"]: c for c in pod_spec["containers"]}


def _mounts(pod_spec: dict) -> dict[str, str]:
    """Claim name → mount path, over the pod's containers."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec.get("volumes", [])}
    return {claims[m["name"]]: m["mountPath"] for c in pod_spec["containers"] for m in c.get("volumeMounts", [])}


def test_daskcluster_manifest_has_what_the_operator_needs():
    (cluster,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text())
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert cluster["kind"] == "DaskCluster"
    name = cluster["metadata"]["name"]
    worker, scheduler = cluster["spec"]["worker"], cluster["spec"]["scheduler"]

    assert isinstance(worker["replicas"], int) and worker["replicas"] >= 1
    (w,) = worker["spec"]["containers"]
    assert w["image"]
    assert w["args"][:3] == ["dask", "cuda", "worker"]
    assert w["args"][w["args"].index("--name") + 1] == "$(DASK_WORKER_NAME)"  # set by the operator
    assert int(w["resources"]["limits"]["nvidia.com/gpu"]) == 1

    (s,) = scheduler["spec"]["containers"]
    assert s["image"] == w["image"]
    assert s["args"][:2] == ["dask", "scheduler"]
    resources = s.get("resources", {})
    assert not any("nvidia.com/gpu" in resources.get(k, {}) for k in ("limits", "requests"))
    container_ports = {p["name"]: p["containerPort"] for p in s["ports"]}
    assert container_ports == {"tcp-comm": 8786, "http-dashboard": 8787}

    service = scheduler["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]}
    assert ports == {"tcp-comm": (8786, "tcp-comm"), "http-dashboard": (8787, "http-dashboard")}

    (pvc,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    assert _mounts(worker["spec"])[claim] == _mounts(scheduler["spec"])[claim]


def test_dva_job_joins_the_cluster_and_sees_the_same_volume():
    cluster = _load(DEPLOY / "kubernetes" / "daskcluster.yaml")
    job = _load(DEPLOY / "kubernetes" / "dva-job.yaml")
    assert job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["dva", "run"]
    assert args[args.index("--scheduler") + 1] == f"tcp://{cluster['metadata']['name']}-scheduler:8786"
    worker_mounts = _mounts(cluster["spec"]["worker"]["spec"])
    assert _mounts(pod) == worker_mounts
    (mount,) = worker_mounts.values()
    paths = [args[2], args[args.index("--mask") + 1], args[args.index("--out") + 1]]
    assert all(p.startswith(mount + "/") for p in paths)


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_tls_config_keys_are_distributeds():
    settings = _leaves(_load(DEPLOY / "tls" / "distributed.yaml"))
    defaults = _leaves(_load(Path(distributed.__file__).parent / "distributed.yaml"))
    assert set(settings) <= set(defaults), set(settings) - set(defaults)
    assert settings["distributed.comm.require-encryption"] is True
    with dask.config.set(settings):
        assert dask.config.get("distributed.comm.tls.ca-file") == settings["distributed.comm.tls.ca-file"]
        security = Security()
    assert security.require_encryption
    for role in ("scheduler", "worker", "client"):
        tls = security.get_tls_config_for_role(role)
        assert tls["ca_file"] and tls["cert"] and tls["key"], role


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    out = tmp_path_factory.mktemp("tls") / "certs"
    result = subprocess.run(
        ["bash", str(DEPLOY / "tls" / "make-certs.sh"), str(out), "scheduler.example.org", "10.0.0.5"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_make_certs_gives_a_ca_and_a_certificate_it_signed(certs: Path):
    assert sorted(p.name for p in certs.iterdir()) == ["ca-key.pem", "ca.pem", "node-key.pem", "node.pem"]
    assert (certs / "node-key.pem").stat().st_mode & 0o077 == 0
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certs / "ca.pem")
    server.load_cert_chain(certs / "node.pem", certs / "node-key.pem")
    client = ssl.create_default_context(cafile=certs / "ca.pem")
    client.load_cert_chain(certs / "node.pem", certs / "node-key.pem")
    again = subprocess.run(["bash", str(DEPLOY / "tls" / "make-certs.sh"), str(certs)], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr  # never replaces a CA


def test_make_certs_secures_a_dask_cluster(certs: Path):
    files = {"ca_file": certs / "ca.pem", "cert": certs / "node.pem", "key": certs / "node-key.pem"}
    security = Security(
        tls_ca_file=str(files["ca_file"]),
        **{
            f"tls_{role}_{kind}": str(files[kind])
            for role in ("scheduler", "worker", "client")
            for kind in ("cert", "key")
        },
        require_encryption=True,
    )
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            protocol="tls://",
            security=security,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster, security=security) as client,
    ):
        assert cluster.scheduler_address.startswith("tls://")
        assert client.submit(sum, [1, 2, 3]).result() == 6
