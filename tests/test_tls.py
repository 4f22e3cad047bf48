"""DICOM TLS: callers with a certificate signed by the configured CA get in; others do not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE

from ingestd.config import Tls
from tests.conftest import make_config, start_receiver
from tests.dicom import make_instance
from tests.hostile import certificates, client_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def test_tls_listener(tmp_path: Path) -> None:
    """A caller with a CA-signed certificate stores over TLS; one without a certificate cannot associate."""
    paths = certificates(tmp_path)
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
            tls_args=(client_context(paths, with_certificate=True), "127.0.0.1"),
        )
        assert good.is_established
        assert good.send_c_store(make_instance()).Status == 0
        good.release()
        anonymous = ae.associate(
            "127.0.0.1",
            running.port,
            ae_title="INGESTD",
            tls_args=(client_context(paths, with_certificate=False), "127.0.0.1"),
        )
        assert not anonymous.is_established
        assert running.journal.instance_count() == 1
    finally:
        running.listener.stop(grace_seconds=1)
        running.journal.close()
