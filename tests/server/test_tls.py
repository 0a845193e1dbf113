"""HTTPS on loopback with a certificate made in the test, and the refusal to serve plain HTTP beyond loopback."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import URL_LINE


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CELLNODE_")}
    return {**clean, "CELLNODE_PROFILE": str(tmp_path / "profile.json")}


def test_https_on_loopback(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    command = [sys.executable, "-m", "cellnode", "serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
    process = subprocess.Popen(
        [*command, "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(tmp_path),
    )
    try:
        assert process.stdout is not None
        url = ""
        deadline = time.monotonic() + 60
        while not url and time.monotonic() < deadline:
            line = process.stdout.readline()
            match = URL_LINE.search(line)
            url = match.group(1) if match else ""
        assert url.startswith("https://127.0.0.1:"), url
        trusted = ssl.create_default_context(cafile=str(cert))
        for _ in range(100):
            try:
                answer = httpx.get(url + "/health", verify=trusted)
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        assert answer.json()["status"] == "ok"
        plain = url.replace("https://", "http://")
        try:
            refused = httpx.get(plain + "/health").status_code
        except httpx.HTTPError:
            refused = 0
        assert refused != 200, "plain HTTP is not served on a TLS port"
    finally:
        process.terminate()
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()


def test_plain_http_beyond_loopback_is_refused_before_listening(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cellnode", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env=env(tmp_path),
        timeout=60,
    )
    assert result.returncode == 1
    assert "is not a loopback address" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_grpc_with_the_same_certificate(tmp_path: Path) -> None:
    """With --tls-cert, the gRPC port speaks TLS with the HTTP front's certificate, and plain gRPC gets nothing."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.helpers import ServerProcess

    cert, key = self_signed(tmp_path)
    server = ServerProcess(
        tmp_path / "data",
        env={"CELLNODE_PROFILE": "none"},
        args=("--tls-cert", str(cert), "--tls-key", str(key), "--grpc-port", "0"),
        verify=ssl.create_default_context(cafile=str(cert)),
    )
    server.start()
    try:
        assert server.url.startswith("https://") and server.grpc_address
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.grpc_address, credentials) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(server.grpc_address) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
                plain_served = True
            except grpc.RpcError:
                plain_served = False
        assert not plain_served, "plain gRPC is not served on a TLS port"
    finally:
        server.stop()
