"""Corpus regression: every DICOM file bundled with pydicom, de-identified by the basic profile (deid.md §6.1.5).

Each readable instance is de-identified with `anonymize` directly (`screen` would hold ultrasound, secondary
capture and structured reports; how many is recorded, but all are de-identified anyway), written with
`enforce_file_format=True`, read back by pydicom and checked by the independent checker; the written files are
also read by DCMTK's dcmdump.
"""

from __future__ import annotations

import copy
import subprocess
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset

from ingestd.deid.engine import DeidError, Labels, anonymize, screen
from ingestd.deid.profile import Profile
from tests import deid_oracle as oracle

PROFILE = Profile(name="basic", key=b"corpus key, tests only, 32 bytes")
EXPECT = oracle.Expectation()


@dataclass
class Case:
    name: str
    source: Path
    original: Dataset
    output: Dataset
    data: bytes
    written: Path


@dataclass
class Corpus:
    cases: list[Case]
    counts: Counter[str]
    held_by_screen: Counter[str]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    out_dir = tmp_path_factory.mktemp("deid-corpus")
    counts: Counter[str] = Counter()
    held: Counter[str] = Counter()
    cases: list[Case] = []
    for name in sorted(get_testdata_files()):
        source = Path(name)
        if not source.is_file():
            counts["not a file"] += 1
            continue
        try:
            with warnings.catch_warnings():  # pydicom warns about the deliberately odd files; not our concern here
                warnings.simplefilter("ignore")
                ds = dcmread(source, force=False)
        except Exception:  # noqa: BLE001 - anything pydicom cannot read is outside this test
            counts["unreadable by pydicom"] += 1
            continue
        meta = getattr(ds, "file_meta", None)
        if "DirectoryRecordSequence" in ds:
            counts["DICOMDIR"] += 1
            continue
        if "SOPInstanceUID" not in ds or meta is None or "TransferSyntaxUID" not in meta:
            counts["no SOP Instance UID or no transfer syntax"] += 1
            continue
        try:
            screen(ds, PROFILE)
        except DeidError as exc:
            held[exc.code] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            before = copy.deepcopy(ds)
            output = anonymize(ds, PROFILE, Labels())
            assert ds == before and ds.file_meta == before.file_meta, f"{source.name}: the input was modified"
        data = oracle.to_bytes(output)
        written = out_dir / f"{output.SOPInstanceUID}.dcm"
        written.write_bytes(data)
        cases.append(Case(source.name, source, ds, output, data, written))
        counts["de-identified"] += 1
    return Corpus(cases, counts, held)


def test_corpus_is_covered(corpus: Corpus) -> None:
    print(f"\ncorpus: {dict(corpus.counts)}; screen would hold {dict(corpus.held_by_screen)}")
    assert corpus.counts["de-identified"] >= 140
    assert corpus.held_by_screen["burned-in"] > 0  # US, SC and friends are de-identified here all the same
    names = {case.name for case in corpus.cases}
    assert {"CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"} <= names


def test_corpus_invariants(corpus: Corpus) -> None:
    problems: dict[str, list[str]] = {}
    for case in corpus.cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # re-reading odd originals warns; the outputs are checked below
            found = oracle.check_instance(case.original, case.output, EXPECT, None, case.data)
            secrets = oracle.secrets(case.original, case.output, EXPECT)
        found += [f"leaked {s!r}" for s in oracle.leaked_secrets(secrets, case.data, case.written.name)]
        found += oracle.check_study([case.original], [case.output], EXPECT)
        if found:
            problems[case.name] = found[:5]
    assert problems == {}


def test_corpus_outputs_reread_without_warnings(corpus: Corpus) -> None:
    """pydicom reads every written output back without a warning, element for element."""
    for case in corpus.cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = dcmread(case.written)
            for node in oracle.walk(None, back):
                assert node.out is not None
                _ = node.out.value
        assert back.SOPInstanceUID == case.output.SOPInstanceUID
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID


def _dcmdump(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dcmdump", *map(str, paths)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        check=False,
        timeout=120,
    )


def _failed(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 or any(line.startswith("E:") for line in result.stderr.splitlines())


def _errors(result: subprocess.CompletedProcess[str], path: Path) -> tuple[int, list[str]]:
    """dcmdump's exit status and error lines, with the file's name taken out so two files can be compared."""
    lines = [line.replace(str(path), "FILE") for line in result.stderr.splitlines() if line.startswith("E:")]
    return result.returncode, lines


@pytest.mark.dcmtk
def test_corpus_outputs_parse_in_dcmdump(corpus: Corpus, dcmtk: None) -> None:
    """DCMTK parses every output; a failure is accepted only where the original fails the same way."""
    problems = []
    batch = 40
    for start in range(0, len(corpus.cases), batch):
        cases = corpus.cases[start : start + batch]
        if not _failed(_dcmdump(*(case.written for case in cases))):
            continue
        for case in cases:  # find the culprits one by one
            out = _dcmdump(case.written)
            if not _failed(out):
                continue
            orig = _dcmdump(case.source)
            if _errors(orig, case.source) != _errors(out, case.written):
                problems.append(f"{case.name}: dcmdump exit {out.returncode}: {out.stderr.strip()[:300]}")
    assert problems == []
