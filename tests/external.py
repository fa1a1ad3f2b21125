"""Clusters started the way users start them (`dask scheduler`, `dask worker` processes on
loopback, random ports), stopped even when a test fails; and TLS certificates made for them."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DASK = [sys.executable, "-m", "dask"]


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and one certificate for 127.0.0.1/localhost signed by it (PEM files), for scheduler,
    workers and client alike; returns the dask CLI's `--tls-*` options → paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM

    def build(subject: str, key, issuer: str, signer, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("dva test CA", ca_key, "dva test CA", ca_key, ca=True)
    cert = build("localhost", key, "dva test CA", ca_key, ca=False)
    paths = {
        "--tls-ca-file": folder / "ca.pem",
        "--tls-cert": folder / "node.pem",
        "--tls-key": folder / "node-key.pem",
    }
    paths["--tls-ca-file"].write_bytes(ca.public_bytes(pem))
    paths["--tls-cert"].write_bytes(cert.public_bytes(pem))
    paths["--tls-key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@contextmanager
def external_cluster(folder: Path, workers: int = 2, tls: dict[str, Path] | None = None) -> Iterator[str]:
    """Start `dask scheduler` and `workers` single-thread `dask worker`s (with nannies); yield the
    scheduler's address; stop them all at the end."""
    info = folder / "scheduler.json"
    security = [a for option, path in (tls or {}).items() for a in (option, str(path))]
    scheduler = [*DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"]
    scheduler += ["--scheduler-file", str(info), *(["--protocol", "tls"] if tls else []), *security]
    procs = [_start(scheduler, folder / "scheduler.log")]
    try:
        deadline = time.time() + 60
        while not info.exists() and time.time() < deadline:
            time.sleep(0.2)
        worker = [*DASK, "worker", "--scheduler-file", str(info), "--nthreads", "1", "--no-dashboard", *security]
        procs += [_start(worker, folder / f"worker-{i}.log") for i in range(workers)]
        address = json.loads(info.read_text())["address"]
        with client_for(address, tls) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _start(command: list[str], log: Path) -> subprocess.Popen:
    """Start `command` with its output going to `log` (read back when a test fails)."""
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def cluster_logs(folder: Path, lines: int = 60) -> str:
    """The last `lines` lines of each log `external_cluster` wrote in `folder`."""
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-lines:]) for p in sorted(folder.glob("*.log"))
    )


@contextmanager
def client_for(address: str, tls: dict[str, Path] | None = None):
    from distributed import Client
    from distributed.security import Security

    security = None
    if tls:
        security = Security(
            tls_ca_file=str(tls["--tls-ca-file"]),
            tls_client_cert=str(tls["--tls-cert"]),
            tls_client_key=str(tls["--tls-key"]),
            require_encryption=True,
        )
    with Client(address, security=security) as client:
        yield client
