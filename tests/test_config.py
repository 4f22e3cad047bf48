"""Configuration loading: defaults, and errors that name the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestd.cli import main
from ingestd.config import load_config, parse_config
from ingestd.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "rules" / "ingestd.example.yaml"


def test_minimal_file_gets_defaults() -> None:
    """A file with only state_dir is enough."""
    config = parse_config("state_dir: /var/lib/ingestd\n")
    assert config.listener.port == 11112
    assert config.listener.ae_title == "INGESTD"
    assert config.listener.allowed_calling_aets == ()
    assert config.spool_dir == Path("/var/lib/ingestd/spool")


def test_every_error_is_reported_with_file_line_and_key() -> None:
    """An unknown key, a wrong type and a bad value are all reported at once, each with its line."""
    text = (
        "state_dir: /tmp/x\n"
        "listener:\n"
        "  port: 99999\n"
        "  ae_titel: SCP\n"
        "drop_folders:\n"
        "  - path: /srv/drop\n"
        "    after: move\n"
        "  - path: /srv/drop2\n"
        "    settle_seconds: soon\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "ingestd.yaml")
    problems = caught.value.problems
    assert "ingestd.yaml:3: listener.port: must be less than or equal to 65535" in problems
    assert "ingestd.yaml:4: listener.ae_titel: unknown key (did you mean 'ae_title'?)" in problems
    assert any(p.startswith("ingestd.yaml:6: drop_folders.0:") and "done_folder" in p for p in problems)
    assert any(p.startswith("ingestd.yaml:9: drop_folders.1.settle_seconds:") for p in problems)
    assert len(problems) == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("state_dir: [unclosed\n", "f.yaml:2: not valid YAML"),
        ("- a\n- b\n", "f.yaml:1: the configuration must be a mapping"),
        ("listener: {}\n", "f.yaml:1: state_dir: required key is missing"),
        ("state_dir: /x\nlistener: {ae_title: 'WAY_TOO_LONG_AE_TITLE'}\n", "f.yaml:2: listener.ae_title:"),
        ("state_dir: /x\nstate_dir: !!python/object:os.system ls\n", "f.yaml:2: not valid YAML"),
    ],
)
def test_bad_files(text: str, expected: str) -> None:
    """Broken YAML, a non-mapping, a missing key and unsafe tags all fail with a located message."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml")
    assert caught.value.problems[0].startswith(expected)


def test_example_config_is_valid() -> None:
    """The example shipped in the repository loads."""
    config = load_config(EXAMPLE)
    assert config.drop_folders


def test_check_config_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ingestd check-config` prints every problem and exits non-zero; no traceback. The example is right once its
    drop folder exists, as its first line says (its paths are relative to the folder ingestd runs in)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ingestd-drop").mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: /x\nlistener:\n  port: -1\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: listener.port:" in err
    assert "Traceback" not in err
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the configuration" in capsys.readouterr().err
