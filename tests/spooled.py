"""A state directory with studies spooled and routed as the daemon leaves them: a real spool, journal and router.

For the commands that read it (`ingestd status`, `ingestd explain --config`). Four batches, each from a source of
its own: de-identified and routed (SCANNER), held unrouted (OTHER), routed without de-identification by a rule whose
labels carry the Patient ID (a drop folder, a patient's name in the file's path), and held from an `import` of a
folder named after a patient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from ingestd.config import Config, load_config
from ingestd.digestkey import load_digest_key
from ingestd.header import read_file_header
from ingestd.journal import Journal, Source, StudyState
from ingestd.pipeline.route import Router
from ingestd.rules import load_rules
from ingestd.spool import Spool
from tests.dicom import encode, make_study

KEY = "k" * 40
PATIENT_ID = "SYN0001"  # tests.dicom's, in every instance
PATIENT_FOLDER = "DOE^JOHN_MRN123"

RULES = """\
profiles:
  research: {key: {env: INGESTD_TEST_KEY}}
rules:
  - name: research
    when: {calling_aet: SCANNER}
    route: {server: main, project: PROJ_A, subject: '{PatientID:hash8}', session: '{subject}_MR', archive: true}
    anonymize: research
  - name: raw-drop
    when: {drop_folder: drop}
    route: {server: main, project: RAW, subject: '{PatientID}', session: '{PatientID}_{StudyDate}'}
"""


@dataclass
class SpooledState:
    """The state directory, its configuration file and what was spooled into it."""

    root: Path
    config_file: Path
    config: Config
    studies: dict[str, list[pydicom.Dataset]] = field(default_factory=dict)  # by source name
    batch_ids: dict[str, int] = field(default_factory=dict)  # by source name

    def uids(self) -> set[str]:
        """Every original Study, Series and SOP Instance UID spooled."""
        return {
            str(ds.get(keyword))
            for study in self.studies.values()
            for ds in study
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        }


def write_config(root: Path, *, rules: bool = True) -> Path:
    (root / "drop").mkdir(exist_ok=True)
    (root / "lab.rules.yaml").write_text(RULES, encoding="utf-8")
    config_file = root / "ingestd.yaml"
    config_file.write_text(
        f"state_dir: {root / 'state'}\n"
        + ("rules: [lab.rules.yaml]\n" if rules else "")
        + f"drop_folders: [{{path: {root / 'drop'}}}]\n"
        "xnat:\n"
        "  servers:\n"
        "    main:\n"
        "      url: http://127.0.0.1:9\n"
        "      credentials: {env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}\n",
        encoding="utf-8",
    )
    return config_file


def spooled_state(root: Path, *, now: float | None = None) -> SpooledState:
    """Spool the four batches (received at `now` minus 3 h, 2 h, 1 h and 10 min), route them, and hold those the
    rules hold. The caller sets INGESTD_TEST_KEY to KEY."""
    now = time.time() if now is None else now
    config_file = write_config(root)
    config = load_config(config_file)
    state = SpooledState(root, config_file, config)
    (root / "state").mkdir()
    load_digest_key(config.state_dir)  # as the daemon makes it at its first start
    journal = Journal(config.journal_path)
    try:
        spool = Spool(config.state_dir / "spool", journal)
        drop = str(root / "drop")
        sources = [
            (Source("dicom", "SCANNER", "INGESTD@127.0.0.1"), make_study(series=2, per_series=2), 3 * 3600),
            (Source("dicom", "OTHER", "INGESTD@127.0.0.1"), make_study(series=1, per_series=3), 2 * 3600),
            (Source("folder", drop, f"{PATIENT_FOLDER}/IM1.dcm"), make_study(series=1, per_series=2), 3600),
            (Source("folder", f"/data/{PATIENT_FOLDER}", "IM1.dcm"), make_study(series=1, per_series=1), 600),
        ]
        for source, study, ago in sources:
            if source.name == "OTHER":
                for ds in study:
                    ds.Modality = "CT"
            for ds in study:
                data = encode(ds)
                spool.store(data[:0], data, read_file_header(data), source)
            name = "import" if source.name.startswith("/data") else "drop" if source.kind == "folder" else source.name
            state.studies[name] = study
            (batch,) = [b for b in journal.batches() if b.study_uid == study[0].StudyInstanceUID]
            state.batch_ids[name] = batch.id
            with journal.transaction() as tx:  # as if it had arrived `ago` seconds ago, and gone quiet at once
                tx.execute(
                    "UPDATE batches SET first_received = ?, last_received = ? WHERE id = ?",
                    (now - ago, now - ago + 5, batch.id),
                )
        for batch in journal.batches((StudyState.RECEIVING,)):
            assert journal.complete_batch(batch.id, batch.last_received, now)
        router = Router(journal, load_rules(config.rules), config.state_dir)
        router.recover()
        for batch in sorted(journal.batches((StudyState.COMPLETE,)), key=lambda b: b.id):
            router.route(batch)
    finally:
        journal.close()
    return state
