"""HTTP Basic on a real daemon behind the README's nginx block (TLS, proxy_pass to the daemon's metrics port), the
password set with the real `ingestd ui-password`: through the proxy the page asks for a password and takes the
right one, the forms' same-site check sees the browser's host, and the daemon's log holds neither the password
nor its hash."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.procs import DaemonProcess, free_port, wait_until, write_daemon_config

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "daemon-password-0123456789"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# .ci/run installs both (nginx-light, openssl): there the test must run, not skip.
pytestmark = pytest.mark.skipif(
    not os.environ.get("CI") and (not Path(NGINX).exists() or shutil.which("openssl") is None),
    reason="nginx or openssl is not installed",
)


def readme_nginx_block() -> str:
    """The README's ```nginx block, as a lab would paste it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```nginx\n(.*?)```", text, flags=re.DOTALL)
    return str(block)


def _certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "proxy.crt", folder / "proxy.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@contextmanager
def nginx(folder: Path, upstream_port: int) -> Iterator[tuple[str, str]]:
    """nginx in the foreground with the README's server block (its port, certificate and upstream replaced): its
    URL, and its certificate (for `verify`)."""
    folder.mkdir()
    cert, key = _certificate(folder)
    port = free_port()
    block = readme_nginx_block()
    block = block.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    block = block.replace("/etc/ssl/certs/ingest.lab.example.pem", str(cert))
    block = block.replace("/etc/ssl/private/ingest.lab.example.key", str(key))
    block = block.replace("127.0.0.1:9471", f"127.0.0.1:{upstream_port}")
    temp = "".join(
        f"{name}_temp_path {folder / name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers read the test's private temporary folder
    (folder / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'};\n"
        f"events {{}}\nhttp {{\naccess_log {folder / 'access.log'};\n{temp}{block}}}\n",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [NGINX, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(folder / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"https://localhost:{port}"

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"nginx ended: {(folder / 'error.log').read_text(errors='replace')}")
            try:
                requests.get(f"{url}/ui/", verify=str(cert), timeout=2)
            except requests.ConnectionError:
                return False
            return True

        wait_until(up, 20, interval=0.2, message="nginx answering")
        yield url, str(cert)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_through_the_readme_nginx_block(tmp_path: Path) -> None:
    passwords = tmp_path / "ui.passwords"
    config = write_daemon_config(
        tmp_path / "ingestd.yaml",
        tmp_path / "state",
        free_port(),
        extra=f"ui: {{password_file: {passwords}, http_basic: true}}\n",
    )
    command = subprocess.run(
        [sys.executable, "-m", "ingestd", "ui-password", "--config", str(config), "alice"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert command.returncode == 0, command.stderr
    assert PASSWORD not in command.stdout + command.stderr
    assert passwords.stat().st_mode & 0o777 == 0o600
    encoded = passwords.read_text(encoding="utf-8").strip().split(":", 1)[1]
    salt, digest = encoded.split("$")[4:]

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        port = int(daemon.wait_logged("metrics.started")["port"])
        with nginx(tmp_path / "nginx", port) as (url, cert):
            asked = requests.get(f"{url}/ui/", timeout=10, verify=cert)
            assert asked.status_code == 401
            assert asked.headers["WWW-Authenticate"].startswith('Basic realm="ingestd"')
            wrong = requests.get(f"{url}/ui/", headers=_basic("alice", "wrong-password-000"), timeout=10, verify=cert)
            assert wrong.status_code == 401
            right = _basic("alice", PASSWORD)
            overview = requests.get(f"{url}/ui/", headers=right, timeout=10, verify=cert)
            assert overview.status_code == 200
            assert "<title>Overview · ingestd</title>" in overview.text
            assert "Log out" not in overview.text and 'href="/ui/login"' not in overview.text
            style = requests.get(f"{url}/ui/static/style.css", headers=right, timeout=10, verify=cert)
            assert style.status_code == 200
            assert requests.get(f"{url}/metrics", timeout=10, verify=cert).status_code == 404  # the page only
            # the forms' same-site check sees the host the browser named, forwarded by the proxy
            action = f"{url}/ui/studies/1/release"
            for origin in (url, "https://evil.example"):
                answer = requests.post(
                    action, headers={**right, "Origin": origin}, allow_redirects=False, timeout=10, verify=cert
                )
                assert answer.status_code == 403
            # the same daemon from this machine without the proxy: a local browser is taken, a forged proxy is not
            direct = f"http://127.0.0.1:{port}/ui/"
            assert requests.get(direct, headers=right, timeout=10).status_code == 200
            forged = requests.get(direct, headers={**right, "X-Forwarded-Proto": "http"}, timeout=10)
            assert forged.status_code == 403
        refused = [(event["reason"], event.get("user")) for event in daemon.logged("ui.action_refused")]
        assert refused == [("no form token", "alice"), ("cross-site", "alice")]
        assert [event["user"] for event in daemon.logged("ui.login")] == ["alice"]
    log = (tmp_path / "daemon.log").read_text(encoding="utf-8")
    for secret in (PASSWORD, encoded, salt, digest):
        assert secret not in log
    assert '"reason": "wrong password"' in log
    assert '"reason": "http basic over plain http"' in log
