"""DICOM TLS: callers with a certificate signed by the configured CA get in; others do not."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE

from ingestd.config import Tls
from tests.conftest import make_config, start_receiver
from tests.dicom import make_instance

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    paths = {
        name: folder / name for name in ("ca.key", "ca.crt", "server.key", "server.crt", "client.key", "client.crt")
    }
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(paths["ca.key"]),
        "-out",
        str(paths["ca.crt"]),
    )
    for role in ("server", "client"):
        csr = folder / f"{role}.csr"
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={role}",
            "-keyout",
            str(paths[f"{role}.key"]),
            "-out",
            str(csr),
        )
        ext = folder / f"{role}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if role == "server" else "extendedKeyUsage=clientAuth\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(paths["ca.crt"]),
            "-CAkey",
            str(paths["ca.key"]),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(paths[f"{role}.crt"]),
        )
    return paths


def _client_context(paths: dict[str, Path], *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(paths["ca.crt"]))
    if with_certificate:
        context.load_cert_chain(str(paths["client.crt"]), str(paths["client.key"]))
    return context


def test_tls_listener(tmp_path: Path) -> None:
    """A caller with a CA-signed certificate stores over TLS; one without a certificate cannot associate."""
    paths = _certificates(tmp_path)
    config = make_config(tmp_path)
    tls = Tls(certificate=paths["server.crt"], key=paths["server.key"], ca_certificates=paths["ca.crt"])
    config = config.model_copy(update={"listener": config.listener.model_copy(update={"tls": tls})})
    running = start_receiver(config)
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage)
        good = ae.associate(
            "127.0.0.1",
            running.port,
            ae_title="INGESTD",
            tls_args=(_client_context(paths, with_certificate=True), "127.0.0.1"),
        )
        assert good.is_established
        assert good.send_c_store(make_instance()).Status == 0
        good.release()
        anonymous = ae.associate(
            "127.0.0.1",
            running.port,
            ae_title="INGESTD",
            tls_args=(_client_context(paths, with_certificate=False), "127.0.0.1"),
        )
        assert not anonymous.is_established
        assert running.journal.instance_count() == 1
    finally:
        running.listener.stop(grace_seconds=1)
        running.journal.close()
