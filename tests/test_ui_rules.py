"""The web page's rules page (`/ui/rules`) and the studies form's age and modality filters.

Over real HTTP (a real MetricsServer with the page mounted) on a state directory spooled and routed by the real
router (tests.spooled: an anonymizing rule and a raw rule whose labels carry the Patient ID), and served by a real
daemon: a study held unrouted is explained, the rules are fixed and SIGHUP'd in, and the page explains what the
held study and a newly routed one would get with the daemon's new rule set. No key, no planted patient value and
no original UID appears in any page.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ingestd.cli import main
from ingestd.config import parse_config
from ingestd.errors import ConfigError
from ingestd.rules import load_rules
from ingestd.status import status_data
from tests.dicom import make_study, write_instances
from tests.procs import (
    SCANNER_RULES,
    DaemonProcess,
    Storescu,
    free_port,
    ingestd_status,
    wait_until,
    write_daemon_config,
)
from tests.spooled import KEY, PATIENT_ID, SpooledState, spooled_state
from tests.test_ui import TOKEN, _login, _phi, _token_file, _with_ui, serving


@pytest.fixture
def spooled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpooledState:
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    return spooled_state(tmp_path)


@pytest.fixture
def page(spooled: SpooledState) -> Iterator[tuple[str, requests.Session]]:
    """The page served over a real MetricsServer, and a logged-in session."""
    config = _with_ui(spooled.config, token_file=_token_file(spooled.root))
    with serving(config) as (url, _app):
        yield url, _login(url)


def _text(html: str) -> str:
    """The page's words, without markup (and entities as the browser shows them)."""
    words = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    return words.replace("&#39;", "'").replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&")


def _no_secret_or_phi(html: str, spooled: SpooledState) -> None:
    for value in (KEY, "INGESTD_TEST_KEY", *_phi(spooled)):
        assert value not in html, value


def test_the_rules_page_lists_each_rule_without_keys_or_patient_values(
    page: tuple[str, requests.Session], spooled: SpooledState
) -> None:
    url, session = page
    answer = session.get(f"{url}/ui/rules", timeout=10)
    assert answer.status_code == 200
    html, text = answer.text, _text(answer.text)
    rules = load_rules(spooled.config.rules)
    assert rules.version in text
    assert str(spooled.config.rules[0]) in text
    assert "this page, from the configuration's files" in text  # no daemon here: the files, as explain loads them
    for expected in (
        "research",
        "lab.rules.yaml:4",
        "calling_aet equals 'SCANNER'",
        "{PatientID:hash8}",
        "{subject}_MR",
        "raw-drop",
        "lab.rules.yaml:8",
        "drop_folder equals 'drop'",
        "{PatientID}_{StudyDate}",
        "none: sent as received",
        "labels from raw identifying values (shown as digests): subject (PatientID), session (PatientID, StudyDate)",
        "Profiles: research (no options). Their keys are not shown.",
    ):
        assert expected in text, expected
    assert '<a href="/ui/rules" aria-current="page">Rules</a>' in html
    assert '<a href="/ui/rules">Rules</a>' in session.get(f"{url}/ui/", timeout=10).text  # the nav, on every page
    _no_secret_or_phi(html, spooled)


def test_explain_says_what_each_spooled_study_would_get(
    page: tuple[str, requests.Session], spooled: SpooledState
) -> None:
    url, session = page
    pages = []

    def explain(reference: str, code: int = 200) -> str:
        answer = session.get(f"{url}/ui/rules", params={"study": reference}, timeout=10)
        assert answer.status_code == code, answer.text
        pages.append(answer.text)
        return _text(answer.text)

    held = explain(str(spooled.batch_ids["OTHER"]))
    assert f"Batch {spooled.batch_ids['OTHER']} : held (unrouted)" in held
    assert "research" in held and "raw-drop" in held
    assert held.count("does not match") == 2
    assert "when.calling_aet equals 'SCANNER': fails" in held  # the condition, never the value it saw
    assert "OTHER" not in held.split("Explain a spooled study")[1]  # the calling AE title seen is not shown
    assert "Held (unrouted) : no rule matches this study (2 rules tried)" in held
    assert " CT (3)" in held  # its series: by digest, modality and count

    raw = explain(f"#{spooled.batch_ids['drop']}")
    assert "raw-drop" in raw and "when.drop_folder equals 'drop': holds" in raw
    labels = re.search(r"XNAT labels (RAW/\S+)", raw)
    assert labels is not None
    # the labels as the study page shows them: built from the Patient ID, so digests under the installation's key
    study_page = _text(session.get(f"{url}/ui/studies/{spooled.batch_ids['drop']}", timeout=10).text)
    assert f"XNAT labels {labels.group(1)}" in study_page
    assert "Shown as digests session, subject" in raw
    assert "De-identification none: sent as received" in raw

    scanner = status_data(spooled.config, running=False)["studies"]  # as the pages read them
    (row,) = [study for study in scanner if study["batch_id"] == spooled.batch_ids["SCANNER"]]
    deidentified = explain(str(row["study"]))  # by the study as the studies page names it: its outgoing UID
    assert "Rule research" in deidentified and "De-identification research" in deidentified
    assert "XNAT labels PROJ_A/" in deidentified and "Archive yes" in deidentified and "Series kept 2" in deidentified

    (other,) = [study for study in scanner if study["batch_id"] == spooled.batch_ids["OTHER"]]
    assert str(other["study"]).startswith("sha256:")
    by_digest = explain(str(other["study"]))  # a study not de-identified: by the digest the studies page shows
    assert f"Batch {spooled.batch_ids['OTHER']} : held (unrouted)" in by_digest
    assert f'value="{other["study"]}"' in pages[-1]  # kept in the form

    assert "no batch is that" in explain("999", 404)
    typed = explain(PATIENT_ID, 404)  # not a batch id or a digest: refused, and not shown back
    assert "give a batch id or a study as the studies page shows it" in typed
    original = str(spooled.studies["OTHER"][0].StudyInstanceUID)
    assert "no batch is that" in explain(original, 404)  # an original UID names nothing here, and is not shown back
    for html in pages:
        _no_secret_or_phi(html, spooled)


def test_the_rules_page_needs_a_login_or_public_read(spooled: SpooledState) -> None:
    config = _with_ui(spooled.config, token_file=_token_file(spooled.root))
    with serving(config) as (url, _app):
        for path in ("/ui/rules", f"/ui/rules?study={spooled.batch_ids['OTHER']}"):
            answer = requests.get(f"{url}{path}", allow_redirects=False, timeout=10)
            assert (answer.status_code, answer.headers["Location"]) == (303, "/ui/login")
            assert "Batch" not in answer.text
        assert requests.post(f"{url}/ui/rules", allow_redirects=False, timeout=10).status_code == 405
        assert _login(url).get(f"{url}/ui/rules", timeout=10).status_code == 200
    with serving(_with_ui(spooled.config, public_read=True)) as (url, _app):
        answer = requests.get(f"{url}/ui/rules?study={spooled.batch_ids['OTHER']}", timeout=10)
        assert answer.status_code == 200 and "held (unrouted)" in answer.text
        # a Host that is not a loopback name needs a login, as every page does (DNS rebinding)
        elsewhere = requests.get(
            f"{url}/ui/rules", headers={"Host": "ingest.example"}, allow_redirects=False, timeout=10
        )
        assert elsewhere.status_code == 303


def test_the_studies_form_filters_by_age_and_modality_and_keeps_them(
    page: tuple[str, requests.Session], spooled: SpooledState
) -> None:
    url, session = page

    def listed(**query: str) -> tuple[set[int], str]:
        answer = session.get(f"{url}/ui/studies", params=query, timeout=10)
        assert answer.status_code == 200, answer.text
        return {int(found) for found in re.findall(r'<a href="/ui/studies/(\d+)">', answer.text)}, answer.text

    ids = spooled.batch_ids
    shown, html = listed(modality="CT")
    assert shown == {ids["OTHER"]}
    assert 'id="f-modality" name="modality" value="CT"' in html
    shown, html = listed(**{"older-than": "90m"})  # received 3 h and 2 h ago
    assert shown == {ids["SCANNER"], ids["OTHER"]}
    assert 'name="older-than" value="90m"' in html
    shown, html = listed(**{"newer-than": "30m", "older-than": "1m"})  # the import, 10 minutes ago
    assert shown == {ids["import"]}
    assert 'name="newer-than" value="30m"' in html and 'name="older-than" value="1m"' in html
    shown, html = listed(**{"older-than": "90m", "modality": "mr"})
    assert shown == {ids["SCANNER"]}
    for label in ('for="f-modality">Modality', 'for="f-older">Older than', 'for="f-newer">Newer than'):
        assert label in html
    bad = session.get(f"{url}/ui/studies", params={"older-than": "soon"}, timeout=10)
    assert bad.status_code == 400
    assert "an age is a number and a unit" in bad.text and 'name="older-than" value="soon"' in bad.text


HELD_RULES = SCANNER_RULES.replace("calling_aet: STORESCU", "calling_aet: SOMEONE_ELSE")


def test_a_daemon_explains_a_held_study_with_the_rules_it_reloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study the daemon holds unrouted is explained on its page with the daemon's rule set; the rules are fixed
    and SIGHUP'd in (with a changed `ui:` and `metrics:`, which the reload logs as needing a restart); the page then
    shows the new rule set, what the held study would get now, and explains a study the daemon routed with it."""
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    rules_file = tmp_path / "lab.rules.yaml"
    rules_file.write_text(HELD_RULES, encoding="utf-8")
    token_file = _token_file(tmp_path)
    port = free_port()
    config = write_daemon_config(
        tmp_path / "ingestd.yaml",
        tmp_path / "state",
        port,
        extra=f"rules: [lab.rules.yaml]\nui: {{token_file: {token_file}}}\n",
    )
    config.write_text(config.read_text().replace("study_idle_seconds: 3600", "study_idle_seconds: 1"))
    first, second = make_study(series=1, per_series=2), make_study(series=2, per_series=1)
    pages = []
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        base = f"http://127.0.0.1:{int(daemon.wait_logged('metrics.started')['port'])}"
        with Storescu(port, write_instances(first, tmp_path / "first")) as storescu:
            assert storescu.wait() == 0, storescu.output()

        def batch(state: str) -> list[int]:
            studies = ingestd_status(config)["studies"]
            assert isinstance(studies, list)
            return [int(study["batch_id"]) for study in studies if study["state"] == state]

        (held,) = wait_until(lambda: batch("held"), 30, interval=0.3)
        session = _login(base)
        answer = session.get(f"{base}/ui/rules", params={"study": str(held)}, timeout=10)
        pages.append(answer.text)
        text = _text(answer.text)
        old_version = load_rules([rules_file]).version
        assert f"Rule set {old_version}" in text and "the daemon (the rules it routes with now)" in text
        assert f"The journal records rule set {old_version} for the daemon (started" in text
        assert "when.calling_aet equals 'SOMEONE_ELSE': fails" in text and "Held (unrouted)" in text

        rules_file.write_text(SCANNER_RULES, encoding="utf-8")
        changed = _text(session.get(f"{base}/ui/rules", timeout=10).text)
        assert "The files have changed since they were loaded" in changed and f"Rule set {old_version}" in changed
        text = config.read_text().replace("metrics: {port: 0}", "metrics: {port: 0, host: localhost}")
        config.write_text(text.replace("ui: {token_file:", "ui: {session_hours: 2, token_file:"))
        os.kill(daemon.pid, signal.SIGHUP)
        applied = wait_until(lambda: [r for r in daemon.logged("daemon.reload") if r["outcome"] == "applied"], 20)
        assert applied[0]["needs_restart"] == ["metrics", "ui"]
        new_version = load_rules([rules_file]).version

        with Storescu(port, write_instances(second, tmp_path / "second")) as storescu:
            assert storescu.wait() == 0, storescu.output()
        (routed,) = wait_until(lambda: batch("routed"), 30, interval=0.3)
        for batch_id in (held, routed):
            answer = session.get(f"{base}/ui/rules", params={"study": str(batch_id)}, timeout=10)
            pages.append(answer.text)
            text = _text(answer.text)
            assert f"Rule set {new_version}" in text and "The files have changed" not in text
            assert "when.calling_aet equals 'STORESCU': holds" in text
            assert "Rule scanner" in text and "XNAT labels PROJ/" in text and "De-identification research" in text
        assert daemon.terminate() == 0
    uids = {str(ds.get(key)) for ds in (*first, *second) for key in ("StudyInstanceUID", "SeriesInstanceUID")}
    for html in pages:
        for value in (KEY, TOKEN, PATIENT_ID, "Synthetic", *uids):
            assert value not in html, value


def test_a_ui_error_names_its_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ui.public_read` off loopback is reported at its own line, as every other key's error is (it was reported at
    line 1 as `(top level)`), and `check-config` prints the same."""
    text = (
        f"state_dir: {tmp_path}\n"
        "metrics:\n"
        "  host: 0.0.0.0\n"
        "ui:\n"
        "  token_file: /etc/ingestd/ui.token\n"
        "  public_read: true\n"
        "  session_hours: 2\n"
    )
    with pytest.raises(ConfigError) as refused:
        parse_config(text, "ingestd.yaml")
    (problem,) = refused.value.problems
    assert problem.startswith("ingestd.yaml:6: ui.public_read: true serves the pages without a login"), problem
    assert "metrics.host is 0.0.0.0" in problem
    config = tmp_path / "ingestd.yaml"
    config.write_text(text, encoding="utf-8")
    assert main(["check-config", str(config)]) == 2
    assert f"{config}:6: ui.public_read: true serves" in capsys.readouterr().err
    # a metrics section that is wrong itself is reported as such, not as a ui error; the section's own errors first
    with pytest.raises(ConfigError) as refused:
        parse_config(text.replace("host: 0.0.0.0", "host: [0.0.0.0]"), "ingestd.yaml")
    assert [problem.split(": ")[1] for problem in refused.value.problems] == ["metrics.host"]
    with pytest.raises(ConfigError) as refused:
        parse_config(text.replace("session_hours: 2", "session_hours: 0"), "ingestd.yaml")
    assert refused.value.problems == ["ingestd.yaml:7: ui.session_hours: must be greater than 0"]


NESTED_RULES = """\
rules:
  - name: nested
    when:
      Modality: {in: [MR, PT]}
      any: [{calling_aet: SCANNER}, {all: [{drop_folder: drop}, {StudyDescription: {present: true}}]}]
      not: {any: [{SeriesDescription: {matches: '(?i)scout'}}, {ImageType: {matches: LOCALIZER}}]}
    route: {server: main, project: P, subject: S, session: T}
"""


@pytest.mark.parametrize(
    ("calling_aet", "modality", "description"),
    [("SCANNER", "MR", "t1"), ("OTHER", "MR", "t1"), ("SCANNER", "CT", "t1"), ("SCANNER", "MR", "my scout")],
)
def test_the_page_s_explanation_agrees_with_explain_without_the_values(
    tmp_path: Path, calling_aet: str, modality: str, description: str
) -> None:
    """Each condition and group of a nested `when` holds or fails on the page as `ingestd explain` says, and the
    rule matches as the router decides; the page's rows carry no value the study holds."""
    from ingestd.rules import SeriesFacts, StudyFacts  # noqa: PLC0415
    from ingestd.rules.when import explain_when, when_holds  # noqa: PLC0415
    from ingestd.ui.rulespage import _why, when_text  # noqa: PLC0415

    file = tmp_path / "nested.rules.yaml"
    file.write_text(NESTED_RULES, encoding="utf-8")
    (rule,) = load_rules([file]).rules
    headers = {"Modality": modality, "SeriesDescription": description, "StudyDescription": "DOE^JOHN head"}
    study = StudyFacts("1.2.3", (SeriesFacts("1.2.3.4", 2, headers, "1.2.840.10008.5.1.4.1.1.4"),), calling_aet)
    rows = list(_why(rule.when, study))
    _holds, lines = explain_when(rule.when, study)
    said = [re.match(r"\s*(when[^\s:]*).*?: (holds|fails)", line) for line in lines]
    assert [(row["key"], "holds" if row["ok"] else "fails") for row in rows] == [
        (found.group(1), found.group(2)) for found in said if found is not None
    ]
    assert all(row["ok"] for row in rows if row["depth"] == 0) == when_holds(rule.when, study)
    shown = repr(rows)
    for value in (description, "DOE^JOHN", calling_aet if calling_aet != "SCANNER" else "OTHER"):
        assert value not in shown
    assert when_text(rule.when) == (
        "Modality in [MR, PT], any[calling_aet equals 'SCANNER'; all[drop_folder equals 'drop'; StudyDescription"
        " present]], not(any[SeriesDescription matches '(?i)scout'; ImageType matches 'LOCALIZER'])"
    )
