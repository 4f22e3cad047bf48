"""`ingestd check-xnat` against the XNAT stand-in: exit status, findings, the write test, and no secret printed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.check_xnat import Finding, check_xnat, exit_status, parse_version
from ingestd.cli import main
from ingestd.config import load_config
from ingestd.testing.xnat import FakeXnat

PASSWORD = "pw-Never-Printed-42"

RULES = """
rules:
  - name: archived
    when: {calling_aet: SCANNER}
    route: {server: main, project: PROJ, subject: '{PatientID}', session: '{PatientID}_MR', archive: true}
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XNAT_CHECK_USER", "ingestd")
    monkeypatch.setenv("XNAT_CHECK_PASSWORD", PASSWORD)


def stand_in(version: str = "1.8.10", **options: Any) -> FakeXnat:
    xnat = FakeXnat(version=version, idle_build_seconds=0.5, rebuild_repeat_seconds=0.1, **options)
    xnat.add_user("ingestd", PASSWORD)
    xnat.add_project("PROJ", members=["ingestd"])
    xnat.add_project("READONLY", collaborators=["ingestd"])
    return xnat


@pytest.fixture
def xnat(env: None) -> Iterator[FakeXnat]:
    with stand_in() as server:
        yield server


def write_config(
    tmp_path: Path, xnat: FakeXnat, rules: str | None = RULES, credentials: str | None = None, extra: str = ""
) -> Path:
    """A configuration (and rules file) as a lab admin writes them, for server `main` at the stand-in."""
    if rules is not None:
        (tmp_path / "lab.rules.yaml").write_text(rules)
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n" + ("rules: [lab.rules.yaml]\n" if rules is not None else "") + "xnat:\n"
        "  servers:\n"
        "    main:\n"
        f"      url: {xnat.url}\n"
        f"      credentials: {credentials or '{env_username: XNAT_CHECK_USER, env_password: XNAT_CHECK_PASSWORD}'}\n"
        "      poll_interval_seconds: 0.05\n"
        "      build_wait_seconds: 0.3\n" + extra
    )
    return config


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`ingestd check-xnat ARGS`: (exit status, stdout + stderr), asserting the password never shows."""
    status = main(["check-xnat", *args])
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    return status, out + err


def lines(output: str, level: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(level)]


@pytest.mark.parametrize(
    ("version", "context_path"), [("1.8.8", ""), ("1.8.9", ""), ("1.8.10", ""), ("1.8.10", "/xnat")]
)
def test_all_ok_with_write_test_leaves_nothing_behind(
    tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str], version: str, context_path: str
) -> None:
    with stand_in(version, context_path=context_path) as xnat:
        config = write_config(tmp_path, xnat)
        status, output = run(capsys, "--config", str(config), "--write-test", "PROJ")
        assert status == 0, output
        assert not lines(output, "warning") and not lines(output, "error")
        assert f"XNAT {version}: " in output
        if version == "1.8.8":
            assert "works with or without dataType" in output
        else:
            assert "needs dataType (ingestd sends it)" in output
        if version == "1.8.10":
            assert "builds synchronously and honours dest" in output
        else:
            assert "ingestd asks for a build after build_wait_seconds (0.3 s)" in output
        assert "main/PROJ: the account can write to the project" in output
        assert "prearchive manual (0)" in output
        assert "non_expiring" in output
        assert "write test: one generated instance imported" in output
        assert xnat.prearchive_rows() == [] and xnat.prearchive_rows("Unassigned") == []
        assert xnat.experiments() == []
        methods = {(method, path.split("?")[0]) for method, path, _status in xnat.requests_log}
        assert ("DELETE", f"{context_path}/data/JSESSION") in methods  # logged out


def test_wrong_password_is_an_error(tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]) -> None:
    xnat.set_password("ingestd", "another-password")
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)))
    assert status == 2
    assert "refused the login (401)" in lines(output, "error")[0]


def test_expired_password_is_an_error_with_advice(
    tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]
) -> None:
    xnat.expire_password("ingestd")
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)))
    assert status == 2
    (error,) = lines(output, "error")
    assert "password has expired" in error and "non_expiring" in error


def test_unreachable_server_is_an_error(tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]) -> None:
    with stand_in() as xnat:
        config = write_config(tmp_path, xnat)
    status, output = run(capsys, "--config", str(config))
    assert status == 2
    assert "cannot log in" in output and "is unreachable" in output


def test_missing_credentials_are_an_error(
    tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XNAT_CHECK_PASSWORD")
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)))
    assert status == 2
    assert "XNAT_CHECK_PASSWORD must be set" in lines(output, "error")[0]
    assert not [method for method, _path, _status in xnat.requests_log]  # nothing sent


def test_read_only_project_is_an_error(tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, xnat, RULES.replace("project: PROJ", "project: READONLY"))
    status, output = run(capsys, "--config", str(config), "--write-test", "READONLY")
    assert status == 2
    errors = lines(output, "error")
    assert any("cannot write to project READONLY" in line and "member or owner" in line for line in errors)
    assert any("write test not run" in line for line in errors)
    assert xnat.prearchive_rows() == [] and xnat.prearchive_rows("Unassigned") == []


def test_unknown_project_is_an_error(tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, xnat, RULES.replace("project: PROJ", "project: NOSUCH"))
    status, output = run(capsys, "--config", str(config))
    assert status == 2
    assert "has no project NOSUCH" in output and "create the project" in output


@pytest.mark.parametrize("version", ["1.8.9", "1.8.10"])
def test_auto_archive_project_with_a_rule_that_does_not_archive_is_a_warning(
    tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    with stand_in(version) as xnat:
        xnat.add_project("AUTO", members=["ingestd"], prearchive_code=4)
        config = write_config(
            tmp_path, xnat, RULES.replace("project: PROJ", "project: AUTO").replace("archive: true", "archive: false")
        )
        status, output = run(capsys, "--config", str(config))
    assert status == 1, output
    (warning,) = lines(output, "warning")
    assert "main/AUTO: prearchive auto-archive (4)" in warning and "archive: false" in warning
    assert "set the project to manual (0)" in warning
    if version == "1.8.10":
        assert "synchronous build never auto-archives" in warning
    else:
        assert "XNAT's own idle build (5-6 min) archives a session whenever ingestd did not build it first" in warning


def test_auto_archive_with_archiving_rules_is_ok_but_overwrite_warns(
    tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]
) -> None:
    xnat.add_project("AUTO", members=["ingestd"], prearchive_code=4)
    xnat.add_project("OVER", members=["ingestd"], prearchive_code=5)
    rules = RULES + RULES.split("rules:\n", 1)[1].replace("archived", "over").replace("project: PROJ", "project: OVER")
    config = write_config(tmp_path, xnat, rules.replace("project: PROJ", "project: AUTO"))
    status, output = run(capsys, "--config", str(config))
    assert status == 1, output
    assert "ok      main/AUTO: prearchive auto-archive (4)" in output
    (warning,) = lines(output, "warning")
    assert "main/OVER: auto-archive with overwrite (5)" in warning and "overwrites" in warning


def test_site_anonymisation_script_is_a_warning(
    tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]
) -> None:
    xnat.set_anon_script('version "6.1"\n(0010,0010) := project\n')
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)))
    assert status == 1
    (warning,) = lines(output, "warning")
    assert "site-wide anonymisation script is enabled" in warning and "SOP Instance UID" in warning


def test_project_anonymisation_script_is_a_warning(
    tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]
) -> None:
    xnat.set_anon_script('version "6.1"\n', project="PROJ")
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)))
    assert status == 1
    (warning,) = lines(output, "warning")
    assert warning.startswith("warning main/PROJ: a project anonymisation script is enabled")


def test_alias_token_near_expiry_from_the_environment_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: None
) -> None:
    with stand_in(token_lifetime_seconds=3600) as xnat:
        alias, secret = xnat.issue_token("ingestd")
        monkeypatch.setenv("XNAT_CHECK_USER", alias)
        monkeypatch.setenv("XNAT_CHECK_PASSWORD", secret)
        status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)))
    assert status == 1, output
    assert secret not in output
    (warning,) = lines(output, "warning")
    assert "alias token from the environment expires in" in warning and "cannot renew" in warning


def test_alias_token_from_a_credentials_file_is_renewed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], env: None
) -> None:
    with stand_in(token_lifetime_seconds=3600) as xnat:
        alias, secret = xnat.issue_token("ingestd")
        credentials = tmp_path / "xnat.credentials"
        credentials.write_text(f"{alias}:{secret}\n")
        credentials.chmod(0o600)
        status, output = run(
            capsys, "--config", str(write_config(tmp_path, xnat, credentials=f"{{file: {credentials}}}"))
        )
    assert status == 0, output
    assert secret not in output
    assert "renewed by ingestd before it expires" in output


def test_expired_alias_token_is_an_error(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT removes expired tokens only in its hourly sweep: one past its time may still log in."""
    alias, secret = xnat.issue_token("ingestd")
    config = load_config(
        write_config(tmp_path, xnat, credentials="{env_username: XNAT_ALIAS, env_password: XNAT_SECRET}")
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XNAT_ALIAS", alias)
        patch.setenv("XNAT_SECRET", secret)
        findings = check_xnat(config, now=lambda: 10.0**12)
    errors = [finding for finding in findings if finding.level == "error"]
    assert [finding.subject for finding in errors] == ["main"]
    assert "expired" in errors[0].message and "issue a new one" in errors[0].advice
    assert exit_status(findings) == 2


def test_json_output(tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]) -> None:
    xnat.set_anon_script('version "6.1"\n')
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)), "main", "--json")
    data = json.loads(output)
    assert status == data["status"] == 1
    assert {finding["level"] for finding in data["findings"]} == {"ok", "warning"}
    assert set(data["findings"][0]) == {"level", "subject", "message", "advice"}


def test_no_rules_is_a_warning(tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]) -> None:
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat, rules=None)))
    assert status == 1
    assert "names no rules file" in lines(output, "warning")[0]


def test_templated_project_is_a_warning(tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, xnat, RULES.replace("project: PROJ", "project: '{StudyDescription}'"))
    status, output = run(capsys, "--config", str(config))
    assert status == 1
    assert "take the project from the study" in lines(output, "warning")[0]


def test_unknown_server_is_a_usage_error(tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]) -> None:
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)), "other")
    assert status == 2
    assert "no XNAT server named other" in output


def test_write_test_that_xnat_files_nowhere_is_an_error_and_cleans_up(
    tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]
) -> None:
    xnat.drop_entries(lambda sop, series, description: True)
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)), "--write-test", "PROJ")
    assert status == 2
    assert "kept no file" in lines(output, "error")[0]
    assert xnat.prearchive_rows() == []


def test_write_test_failed_import_leaves_nothing(
    tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]
) -> None:
    """XNAT stores the file and then answers an error (a proxy 504 after the work): the session is still deleted."""
    xnat.fail_next("POST", "/data/services/import", status=400, body="Bad things", after_processing=True)
    status, output = run(capsys, "--config", str(write_config(tmp_path, xnat)), "--write-test", "PROJ")
    assert status == 2
    assert "write test: XNAT main could not import" in lines(output, "error")[0]
    assert xnat.prearchive_rows() == []


def test_parse_version() -> None:
    assert parse_version("1.8.10") == (1, 8, 10)
    assert parse_version("1.8.11-SNAPSHOT") == (1, 8, 11)
    assert parse_version("1.9") == (1, 9, 0)
    assert parse_version("unknown") is None
    assert exit_status([Finding("ok", "a", "b")]) == 0


def test_rules_that_do_not_load_are_a_usage_error(
    tmp_path: Path, xnat: FakeXnat, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, xnat, RULES.replace("server: main", "server: elsewhere"))
    status, output = run(capsys, "--config", str(config))
    assert status == 2
    assert "elsewhere" in output and "not defined under xnat.servers" in output
    assert not xnat.requests_log  # nothing was asked of XNAT
