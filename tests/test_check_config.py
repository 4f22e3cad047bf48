"""`ingestd check-config` catches each mistake a lab admin makes, at once, as `file:line: key: problem`, in ingestd's
words; `ingestd run` refuses the same errors (one test per mistake of issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingestd.admin.checkconfig import check_config
from ingestd.cli import main

PASSWORD = "s3cret-Pa55word"  # a test credential: must never be printed

RULES = """\
rules:
  - name: all
    when: {Modality: MR}
    route: {server: main, project: P, subject: S, session: X}
"""


class Setup:
    """A configuration whose every file and folder exists and is right; each test breaks one thing."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.drop = tmp_path / "drop"
        self.drop.mkdir()
        self.credentials = tmp_path / "xnat.credentials"
        self.credentials.write_text(f"ingestd:{PASSWORD}\n")
        self.credentials.chmod(0o600)
        self.rules = tmp_path / "lab.rules.yaml"
        self.rules.write_text(RULES)
        self.config = tmp_path / "ingestd.yaml"
        self.write()

    def text(self, credentials: str = "") -> str:
        return (
            f"state_dir: {self.root / 'state'}\n"
            "listener: {port: 11112}\n"
            f"drop_folders: [{{path: {self.drop}}}]\n"
            "rules: [lab.rules.yaml]\n"
            "xnat:\n"
            "  servers:\n"
            "    main:\n"
            "      url: http://127.0.0.1:8080\n"
            f"      credentials: {credentials or '{file: ' + str(self.credentials) + '}'}\n"
        )

    def write(self, text: str | None = None) -> None:
        self.config.write_text(self.text() if text is None else text)

    def check(self, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, list[str], str]:
        """Run `ingestd check-config`: (exit status, the lines on stderr, stdout)."""
        status = main(["check-config", *options, str(self.config)])
        out, err = capsys.readouterr()
        assert PASSWORD not in out + err
        return status, err.splitlines(), out


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_a_right_configuration_is_ok(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    status, errors, out = setup.check(capsys)
    assert (status, errors) == (0, [])
    assert out.startswith(f"{setup.config}: OK")


def test_missing_rules_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.rules.unlink()
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [f"{setup.config}:4: rules.0: rules file {setup.rules} does not exist"]


def test_missing_drop_folder(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.drop.rmdir()
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert len(errors) == 1
    assert errors[0].startswith(f"{setup.config}:3: drop_folders.0.path: drop folder {setup.drop} does not exist")
    assert f"mkdir -p {setup.drop}" in errors[0]


def test_missing_credentials_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.credentials.unlink()
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.config}:9: xnat.servers.main.credentials.file: credentials file {setup.credentials} does not exist"
    ]


def test_world_readable_credentials_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.credentials.chmod(0o644)
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.config}:9: xnat.servers.main.credentials.file: credentials file {setup.credentials} is readable "
        f"by others (mode 0644): chmod 600 {setup.credentials}"
    ]


def test_unparseable_credentials_file_is_named_without_its_secret(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.credentials.write_text(f"ingestd {PASSWORD}\n")  # no colon
    status, errors, _ = setup.check(capsys)  # asserts the password is not printed
    assert status == 2
    assert errors == [
        f"{setup.config}:9: xnat.servers.main.credentials.file: {setup.credentials} must hold one line "
        "username:password (or alias:secret)"
    ]


def test_netrc_without_the_server_host(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    netrc = setup.root / "netrc"
    netrc.write_text(f"machine xnat.example.org login ingestd password {PASSWORD}\n")
    netrc.chmod(0o600)
    setup.write(setup.text(credentials=f"{{netrc: {netrc}}}"))
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.config}:9: xnat.servers.main.credentials.netrc: {netrc} has no login and password "
        "for machine 127.0.0.1"
    ]


def test_unset_credential_environment_variable(
    setup: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAB_XNAT_USER", "ingestd")
    monkeypatch.setenv("LAB_XNAT_PASSWORD", "")  # set but empty: as good as unset
    monkeypatch.delenv("LAB_XNAT_NOPE", raising=False)
    setup.write(setup.text(credentials="{env_username: LAB_XNAT_USER, env_password: LAB_XNAT_PASSWORD}"))
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert len(errors) == 1
    assert errors[0].startswith(
        f"{setup.config}:9: xnat.servers.main.credentials.env_password: environment variable LAB_XNAT_PASSWORD is "
        "not set (or empty)"
    )
    monkeypatch.setenv("LAB_XNAT_PASSWORD", PASSWORD)
    assert setup.check(capsys)[:2] == (0, [])


def test_unknown_server_name_in_a_rule(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.rules.write_text(RULES.replace("server: main", "server: mian"))
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.rules}:4: rules.0.route.server: no XNAT server 'mian' in xnat.servers of {setup.config} "
        "(did you mean 'main'?) (the servers are: main)"
    ]


def test_duplicate_keys_name_both_lines(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write(setup.text() + "listener: {port: 104}\n")
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.config}:10: listener: given twice, on lines 2 and 10 (YAML would keep only this one): remove one"
    ]


def test_infinite_number(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write(setup.text() + "study_idle_seconds: .inf\nstop_timeout_seconds: .nan\n")
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.config}:10: study_idle_seconds: must be a finite number (.inf and .nan are not)",
        f"{setup.config}:11: stop_timeout_seconds: must be a finite number (.inf and .nan are not)",
    ]


def test_absurd_pdu_size_port_and_timeout(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write(
        setup.text().replace("{port: 11112}", "{port: 11112, max_pdu_size: 1099511627776}")
        + "metrics: {port: 11112}\nwedged_worker_seconds: 300000000\n"
    )
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.config}:2: listener.max_pdu_size: max_pdu_size is the largest PDU ingestd accepts: 4096 to 67108864 "
        "bytes (0, no limit, would let a peer make ingestd buffer any amount)"
    ]
    setup.write(setup.text() + "metrics: {port: 11112}\nwedged_worker_seconds: 300000000\n")
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.config}:10: metrics.port: port 11112 is the DICOM listener's too: choose another",
        f"{setup.config}:11: warning: wedged_worker_seconds: 3e+08 seconds is 3472 days: seconds were meant?",
    ]


def test_pydantic_wording_is_gone(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write(
        setup.text().replace("[{path:", "{path:").replace("}]", "}")
        + "listener: {port: eleven, allowed_calling_aets: SCANNER, enabled: maybe}\n"
    )
    status, errors, _ = setup.check(capsys)
    assert status == 2
    text = "\n".join(errors)
    for pydantic in ("Input should", "valid tuple", "valid dictionary", "instance of", "Value error"):
        assert pydantic not in text
    assert f"{setup.config}:3: drop_folders: must be a list (one `- item` a line, or [a, b])" in errors
    assert f"{setup.config}:10: listener.port: must be a whole number" in errors
    assert f"{setup.config}:10: listener.enabled: must be true or false" in errors


def test_did_you_mean_for_unknown_keys(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        setup.text().replace("listener: {port:", "listner: {port:").replace("credentials: {file:", "credentals: {file:")
    )
    text = text.replace(f"[{{path: {setup.drop}}}]", f"[{{path: {setup.drop}, setle_seconds: 3}}]")
    setup.write(text + "metrics: {prot: 9000}\nstudy_idle: 30\n")
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.config}:2: listner: unknown key (did you mean 'listener'?)",
        f"{setup.config}:3: drop_folders.0.setle_seconds: unknown key (did you mean 'settle_seconds'?)",
        f"{setup.config}:7: xnat.servers.main.credentials: required key is missing",
        f"{setup.config}:9: xnat.servers.main.credentals: unknown key (did you mean 'credentials'?)",
        f"{setup.config}:10: metrics.prot: unknown key (did you mean 'port'?)",
        f"{setup.config}:11: study_idle: unknown key (did you mean 'study_idle_seconds'?)",
    ]


def test_warnings_go_to_stderr_with_status_0(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write(setup.text().replace("{port: 11112}", "{port: 0}"))
    status, errors, out = setup.check(capsys)
    assert status == 0
    assert errors == [f"{setup.config}:2: warning: listener.port: 0 takes any free port: scanners cannot find it"]
    assert out == f"{setup.config}: OK (state_dir {setup.root / 'state'}, 1 warning)\n"


def test_every_problem_at_once(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.rules.unlink()
    setup.drop.rmdir()
    setup.credentials.chmod(0o640)
    report = check_config(setup.config)
    assert [problem.split(": ")[1] for problem in report.errors] == [
        "drop_folders.0.path",
        "rules.0",
        "xnat.servers.main.credentials.file",
    ]


def test_check_config_rules_runs_check_rules(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    status, errors, out = setup.check(capsys, "--rules")
    assert (status, errors) == (0, [])
    assert out.splitlines()[1].startswith(f"{setup.rules}: OK (1 rule, 0 profiles")
    setup.rules.write_text(RULES.replace("Modality: MR", "Modalty: MR"))
    assert setup.check(capsys)[0] == 0  # without --rules the rules are not validated
    status, errors, _ = setup.check(capsys, "--rules")
    assert status == 2
    assert len(errors) == 1
    assert errors[0].startswith(f"{setup.rules}:3: rules.0.when.Modalty: unknown DICOM keyword 'Modalty'")


def test_run_refuses_what_check_config_calls_an_error(setup: Setup, tmp_path: Path) -> None:
    setup.drop.rmdir()
    setup.credentials.chmod(0o644)
    env = {key: value for key, value in os.environ.items() if not key.startswith("INGESTD")}
    run = subprocess.run(
        [sys.executable, "-m", "ingestd", "run", "--config", str(setup.config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.splitlines()
    assert lines[0].startswith(f"{setup.config}:3: drop_folders.0.path: drop folder {setup.drop} does not exist")
    assert lines[1].startswith(f"{setup.config}:9: xnat.servers.main.credentials.file: credentials file")
    assert lines[2] == f"ingestd: not started: fix the above (ingestd check-config {setup.config})"
    assert not (tmp_path / "state").exists()  # refused before anything was created
    assert PASSWORD not in run.stdout + run.stderr


def test_credentials_file_of_another_user(setup: Setup) -> None:
    other = setup.credentials.stat().st_uid + 1  # as if the daemon's user were another than the file's owner
    report = check_config(setup.config, uid=other)
    owned = [problem for problem in report.errors if "belongs to" in problem]
    assert len(owned) == 1, report.errors
    assert owned[0].startswith(f"{setup.config}:9: xnat.servers.main.credentials.file: credentials file")


def test_keys_the_rules_name(setup: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAB_TEST_KEY", raising=False)
    setup.rules.write_text("profiles:\n  research: {key: {env: LAB_TEST_KEY}}\n  pet: {key: {file: pet.key}}\n" + RULES)
    status, errors, _ = setup.check(capsys)
    assert status == 2
    assert errors == [
        f"{setup.rules}:2: profiles.research.key: environment variable LAB_TEST_KEY is not set; it must hold the key"
        " (32+ characters)",
        f"{setup.rules}:3: profiles.pet.key: key file {setup.root / 'pet.key'} does not exist (create one with: "
        f"ingestd new-key {setup.root / 'pet.key'})",
    ]
    monkeypatch.setenv("LAB_TEST_KEY", "k" * 40)
    assert main(["new-key", str(setup.root / "pet.key")]) == 0
    assert setup.check(capsys)[:2] == (0, [])


def test_check_config_rules_reports_both_at_once(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.drop.rmdir()
    setup.rules.write_text(RULES.replace("Modality: MR", "Modalty: MR"))
    status, errors, _ = setup.check(capsys, "--rules")
    assert status == 2
    assert [error.split(": ")[1] for error in errors] == ["drop_folders.0.path", "rules.0.when.Modalty"]
