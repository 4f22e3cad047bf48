"""`ingestd import` keeps the files a rule's `attach:` takes, as the watcher does, and completes their sets at once.

The importer of `ingestd.bulk` runs in-process over a real state directory (journal, spool, attachment spool) and
real files, with a rule carrying `attach:` globs (`tests.attaching`); it never moves or changes the user's files.
"""

from __future__ import annotations

import os
from pathlib import Path

from ingestd.bulk import _Importer, _Survey
from ingestd.config import Config, load_config
from ingestd.journal import Journal
from ingestd.progress import Counts
from ingestd.receive.intake import NO_RULE_ATTACHES, find_sources
from ingestd.rules.match import RuleSet
from ingestd.states import BatchKind, StudyState
from tests.attaching import attach_rules, digests, instance_uploads, kept_files, spool_files
from tests.dicom import encode, make_study
from tests.procs import journal_rows

GLOBS = ("*/*/qBOLD/**", "**/*.PAR", "**/*.REC")


def config_for(tmp_path: Path) -> Config:
    path = tmp_path / "ingestd.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "listener: {enabled: false}\n"
        "spool: {min_free_mb: 0}\n"
        "xnat:\n"
        "  servers:\n"
        "    main:\n"
        "      url: http://127.0.0.1:9\n"
        "      credentials: {env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}\n"
    )
    (tmp_path / "state").mkdir(exist_ok=True)
    return load_config(path)


def set_source(journal: Path, batch_id: int) -> str:
    [(source,)] = journal_rows(journal, "SELECT source FROM batches WHERE id = %d" % batch_id)  # noqa: S608, UP031
    return str(source)


def import_once(config: Config, rules: RuleSet, *paths: Path) -> tuple[_Importer, Counts]:
    """Take every file under `paths` and complete what was touched, as `ingestd import` does before it waits."""
    counts = Counts()
    importer = _Importer(config, Journal(config.journal_path), counts, None, rules)
    try:
        importer.take_all(find_sources(list(paths)))
        importer.complete()
        importer.finished()
    finally:
        importer.close()
    return importer, counts


def snapshot(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_a_resource_tree_is_attached_its_sets_completed_and_a_second_import_keeps_nothing_twice(tmp_path: Path) -> None:
    config, rules = config_for(tmp_path), attach_rules(tmp_path, *GLOBS)
    tree = tmp_path / "tree"
    study = make_study(series=1, per_series=2)
    files = {
        "sub01/ses01/qBOLD/OEF.nii": os.urandom(200_000),
        "sub01/ses01/qBOLD/fit/R2.txt": b"fit\n" * 100,
        "sub02/ses01/qBOLD/OEF.nii": os.urandom(6 * 1024 * 1024),  # copied as it is read
        "sub01/ses01/scan.PAR": b"# PAR\n",
    }
    for relative, data in {**files, "sub01/ses01/IM0.dcm": encode(study[0]), "sub01/notes.txt": b"x"}.items():
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_bytes(data)
    (tree / "sub01/ses01/IM1.dcm").write_bytes(encode(study[1]))
    before = snapshot(tree)

    importer, counts = import_once(config, rules, tree)
    assert snapshot(tree) == before  # never moved or changed
    journal = config.journal_path
    assert instance_uploads(journal) == {str(ds.SOPInstanceUID): "." for ds in study}
    kept = kept_files(journal)
    assert set(kept) == set(files)
    for relative, data in files.items():
        row = kept[relative]
        assert (row.sha256, row.md5, row.size) == (*digests(data), len(data))
        assert (row.upload, row.source_detail, row.kind) == (".", relative, BatchKind.FILES)
        assert row.state == StudyState.COMPLETE  # completed at once, as the import's batches
        assert (config.state_dir / row.spool_path).read_bytes() == data
    [set_id] = {row.batch_id for row in kept.values()}
    assert set_id in importer.touched  # the import waits for the set as for its studies
    assert set_source(journal, set_id) == str(tree)
    assert (counts.attached, counts.attached_known, counts.quarantined) == (4, 0, 1)
    assert [problem.reason for problem in importer.problems] == [f"not a DICOM file, and {NO_RULE_ATTACHES}"]

    again, counts = import_once(config, rules, tree)
    assert (counts.attached, counts.attached_known) == (4, 4)
    assert kept_files(journal) == kept  # the same rows: nothing kept twice
    assert spool_files(config.state_dir) == {row.spool_path for row in kept.values()}
    assert set_id in again.touched


def test_a_file_given_alone_is_its_own_upload(tmp_path: Path) -> None:
    config, rules = config_for(tmp_path), attach_rules(tmp_path, *GLOBS)
    given = tmp_path / "exports" / "scan.REC"
    given.parent.mkdir()
    given.write_bytes(b"REC bytes")
    import_once(config, rules, given)
    [row] = kept_files(config.journal_path).values()
    assert (row.relative, row.upload, row.source_detail) == ("scan.REC", "scan.REC", "scan.REC")
    assert set_source(config.journal_path, row.batch_id) == str(given.parent)
    assert given.read_bytes() == b"REC bytes"


def test_a_dry_run_survey_keeps_nothing_and_quarantines_nothing_a_rule_attaches(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub01/ses01/qBOLD").mkdir(parents=True)
    (tree / "sub01/ses01/qBOLD/OEF.nii").write_bytes(b"x" * 100)
    (tree / "sub01/notes.txt").write_bytes(b"y")
    survey = _Survey(config_for(tmp_path).archives, Counts(), attach_rules(tmp_path, *GLOBS))
    survey.take_all(find_sources([tree]))
    assert survey.attached == ["sub01/ses01/qBOLD/OEF.nii"]
    assert [problem.detail for problem in survey.problems] == ["sub01/notes.txt"]
    assert not (tmp_path / "state" / "attachments").exists()
