"""dicom3tools' validator before and after de-identification: our output has no IOD error its input did not have.

The corpus (tests/validator_corpus.py) is built in the test run: pydicom's and pydicom-data's test files, deid-data's
DICOM files and DCMTK conversions of a subset into other transfer syntaxes. Each instance is de-identified through
the daemon's write path (`ingestd.pipeline.route.deidentify_file`) with the basic profile and each option set
of `OPTION_SETS`; instances `screen` would hold are de-identified anyway (counted). `dciodvfy -new` runs on every
input and every output (tests/dciodvfy.py reads its findings without values or item numbers) and an Error the
output has more often than its input is new. New errors fail the test with the file, the option set and the
message, except those on the reviewed allow-list (tests/data/dciodvfy-allowed.yaml: file, option sets, message,
reason). New Warnings are printed, not failed on.

An input dciodvfy cannot read to the end (it gives up at an odd-length element, say) is compared as DCMTK
re-encodes it (`dcmconv +t=`, not de-identified; `validator_corpus.reencode`): what de-identification adds is still
new. When that cannot be read either (dciodvfy aborts on 32-bit pixel data), its outputs are not compared;
both lists are in the summary.

Run alone: `.venv/bin/pytest tests/test_deid_validator.py -q -s` (-s prints the summary and the new warnings).
Measured on 2 shared cores (2026-12-06): 265 inputs, 1057 outputs, 30-45 s in all; dciodvfy over those 1318 files
took 39 s one at a time and 16 s on a pool of 2 threads, which also overlaps it with the de-identification.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests import dciodvfy
from tests import validator_corpus as corpus
from tests.dciodvfy import Finding, Report

ALLOWED = Path(__file__).parent / "data" / "dciodvfy-allowed.yaml"


@dataclass(frozen=True)
class Allowed:
    file: str
    options: tuple[str, ...]  # option set names (validator_corpus.OPTION_SETS)
    error: str  # the start of the finding as tests/dciodvfy.py writes it: "Error - </Path(gggg,eeee)> - message"
    reason: str

    def covers(self, file: str, options: str, finding: Finding) -> bool:
        return file == self.file and options in self.options and str(finding).startswith(self.error)


def load_allowed() -> list[Allowed]:
    entries = yaml.safe_load(ALLOWED.read_text(encoding="utf-8")) or []
    return [
        Allowed(entry["file"], tuple(entry.get("options", corpus.OPTION_SETS)), entry["error"], entry["reason"])
        for entry in entries
    ]


@dataclass
class Outcome:
    """What the run found, by input name and option set."""

    sources: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    conversion_failures: list[str] = field(default_factory=list)
    held_by_screen: Counter[str] = field(default_factory=Counter)
    held: list[str] = field(default_factory=list)  # "<file> [<options>]: <hold code>"
    reencoded_baseline: list[str] = field(default_factory=list)
    without_baseline: list[str] = field(default_factory=list)
    outputs: int = 0
    new_errors: dict[tuple[str, str], Counter[Finding]] = field(default_factory=dict)
    new_warnings: dict[tuple[str, str], Counter[Finding]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def dicom3tools() -> None:
    """Skip locally when dciodvfy or DCMTK's converters are missing; .ci/run installs them, so CI never skips."""
    missing = corpus.tools_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not installed: .ci/run must apt-get install dicom3tools and dcmtk")
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install dicom3tools dcmtk)")


def _baselines(
    sources: list[corpus.Source], before: dict[str, Future[Report]], work: Path, found: Outcome
) -> dict[str, Report]:
    """Each input's report; for an incomplete one, its DCMTK re-encoding's when that one is complete."""
    baselines = {name: future.result() for name, future in before.items()}
    for number, source in enumerate(sources):
        if baselines[source.name].complete:
            continue
        reencoded = work / f"reencoded-{number:03d}.dcm"
        if corpus.reencode(source.path, reencoded):
            report = dciodvfy.validate(reencoded, work)
            if report.complete:
                baselines[source.name] = report
                found.reencoded_baseline.append(source.name)
    return baselines


@pytest.fixture(scope="module")
def outcome(dicom3tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    work = tmp_path_factory.mktemp("validator")
    found = Outcome()
    packaged = corpus.packaged_sources()
    converted, found.conversion_failures = corpus.dcmtk_conversions(packaged, work)
    sources = []
    for source in packaged + converted:
        reason = corpus.usable(source, work)
        if reason is None:
            sources.append(source)
        else:
            found.skipped[reason] += 1
    found.sources = [source.name for source in sources]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # dciodvfy runs while Python de-identifies
        before: dict[str, Future[Report]] = {s.name: pool.submit(dciodvfy.validate, s.path, work) for s in sources}
        after: dict[tuple[str, str], Future[Report]] = {}
        for number, source in enumerate(sources):
            for options_name, options in corpus.OPTION_SETS.items():
                folder = work / f"out-{number:03d}-{options_name}"
                folder.mkdir()
                done = corpus.deidentify(source.path, options, folder, work)
                if done.held_by_screen is not None:
                    found.held_by_screen[done.held_by_screen] += 1
                if done.path is None:
                    found.held.append(f"{source.name} [{options_name}]: {done.held}")
                    continue
                after[source.name, options_name] = pool.submit(dciodvfy.validate, done.path, work)
        found.outputs = len(after)
        baselines = _baselines(sources, before, work, found)
        for (name, options_name), future in after.items():
            baseline, report = baselines[name], future.result()
            if not baseline.complete:
                found.without_baseline.append(name)
                continue
            found.new_errors[name, options_name] = report.errors() - baseline.errors()
            found.new_warnings[name, options_name] = report.warnings() - baseline.warnings()
    found.without_baseline = sorted(set(found.without_baseline))
    yield found
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.dicom3tools
@pytest.mark.slow
def test_corpus_is_built(outcome: Outcome) -> None:
    held = Counter(entry.rsplit(": ", 1)[1] for entry in outcome.held)
    print(
        f"\nvalidator corpus: {len(outcome.sources)} instances x {len(corpus.OPTION_SETS)} option sets -> "
        f"{outcome.outputs} outputs; left out: {dict(outcome.skipped)}; DCMTK refused: {outcome.conversion_failures}; "
        f"screen would hold (de-identified anyway): {dict(outcome.held_by_screen)}; the engine held: {dict(held)} "
        f"{outcome.held}; compared with the input as DCMTK re-encodes it (dciodvfy cannot read the input to the end): "
        f"{outcome.reencoded_baseline}; not compared (nor its re-encoding): {outcome.without_baseline}"
    )
    assert len(set(outcome.sources)) == len(outcome.sources), "two sources with one name"
    origins = Counter(name.partition(":")[0] for name in outcome.sources)
    assert origins["pydicom"] >= 140
    assert origins["pydicom-data"] >= 50
    assert origins["deid-data"] >= 10
    assert origins["dcmtk"] >= 30
    assert outcome.conversion_failures == []
    assert {"pydicom:CT_small.dcm", "deid-data:animals/cat.dcm", "dcmtk:CT_small.dcm>rle"} <= set(outcome.sources)
    assert outcome.held_by_screen["burned-in"] > 0
    assert len(outcome.without_baseline) <= 12  # deliberately broken files and dciodvfy's limits: listed above


@pytest.mark.dicom3tools
@pytest.mark.slow
def test_no_new_validator_errors(outcome: Outcome) -> None:
    allowed = load_allowed()
    new = []
    for (name, options), errors in sorted(outcome.new_errors.items()):
        for finding, count in sorted(errors.items()):
            if not any(entry.covers(name, options, finding) for entry in allowed):
                new.append(f"{name} [{options}]: {finding}" + (f" (x{count})" if count > 1 else ""))
    warnings: Counter[str] = Counter()  # message -> outputs
    for found in outcome.new_warnings.values():
        warnings.update(f"{finding.path} - {finding.message}" for finding in found)
    print(f"\nnew dciodvfy warnings (recorded, not failed on), by outputs that have them: {warnings.total()}")
    for text, count in warnings.most_common():
        print(f"  {count:4d}  {text}")
    assert new == [], "new dciodvfy errors:\n" + "\n".join(new)


@pytest.mark.dicom3tools
@pytest.mark.slow
def test_allow_list_is_specific_and_used(outcome: Outcome) -> None:
    """Each entry names one corpus file, known option sets, one element and a reason; each still matches an error
    (a stale entry is removed, not kept "just in case")."""
    for entry in load_allowed():
        assert entry.file in outcome.sources, entry
        assert set(entry.options) <= set(corpus.OPTION_SETS), entry
        assert entry.error.startswith("Error - </") and ")> - " in entry.error, f"no element path: {entry}"
        assert len(entry.error.partition(")> - ")[2]) >= 10, f"no message: {entry}"
        assert len(entry.reason) >= 40, f"no reason: {entry}"
        used = any(
            entry.covers(entry.file, options, finding)
            for options in entry.options
            for finding in outcome.new_errors.get((entry.file, options), Counter())
        )
        assert used, f"stale allow-list entry (no such new error any more): {entry}"


@pytest.mark.dicom3tools
def test_an_attribute_removed_from_a_valid_input_is_a_new_error(dicom3tools: None, tmp_path: Path) -> None:
    """The comparison is not vacuous: CT_small.dcm without its Image Position (Patient), Type 1 in the Image Plane
    module, has exactly that one new error, whatever values the other attributes hold."""
    source = Path(str(get_testdata_file("CT_small.dcm")))
    ds = dcmread(source)
    del ds.ImagePositionPatient
    ds.PatientName = "Other^Name"
    ds.InstanceNumber = 7
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken, enforce_file_format=True)
    before, after = dciodvfy.validate(source, tmp_path), dciodvfy.validate(broken, tmp_path)
    assert before.complete and after.complete and before.iod == after.iod == "CTImage"
    assert after.errors() - before.errors() == Counter(
        {
            Finding(
                "Error",
                "/ImagePositionPatient(0020,0032)",
                "Missing attribute for Type 1 Required - Module=<ImagePlane>",
            ): 1
        }
    )


def test_an_allow_list_entry_covers_one_file_option_set_and_message() -> None:
    entry = Allowed(
        "pydicom-data:bad_sequence.dcm",
        ("uids+full-dates",),
        "Error - </MediaStorageSOPInstanceUID(0002,0003)> - Illegal root for UID",
        "the input's SOP Instance UID is not a UID, retain-uids keeps it",
    )
    finding = Finding("Error", "/MediaStorageSOPInstanceUID(0002,0003)", "Illegal root for UID = <>")
    assert entry.covers("pydicom-data:bad_sequence.dcm", "uids+full-dates", finding)
    assert not entry.covers("pydicom-data:bad_sequence.dcm", "basic", finding)
    assert not entry.covers("pydicom:bad_sequence.dcm", "uids+full-dates", finding)
    other = Finding("Error", "/SOPInstanceUID(0008,0018)", "Illegal root for UID = <>")
    assert not entry.covers("pydicom-data:bad_sequence.dcm", "uids+full-dates", other)
    assert isinstance(load_allowed(), list)


# -- reading dciodvfy's output (no tools needed) ---------------------------------------------------------------

_OUTPUT = """\
Error - </PatientWeight(0010,1030)[1]> - Value is zero
CTImage
Error - </ReferencedStudySequence(0008,1110)[1]/ReferencedSOPInstanceUID(0008,1155)> - Missing attribute for Type 1 \
Required - Module=<SOPInstanceReferenceMacro>
Error - </SOPInstanceUID(0008,0018)[1]> - Value invalid for this VR [UI] = <1.2.x> - Character invalid for this VR \
= 'x' (0x78)
Error - </SOPInstanceUID(0008,0018)[1]> - Value invalid for this VR [UI] = <1.2.y> - Character invalid for this VR \
= 'y' (0x79)
Warning - </Laterality(0020,0060)> - is only permitted to be empty when actually unknown
Error - </ImageComments(0020,4000)> - Value invalid for this VR [LT] = <first line
second line> - Character invalid
"""


def test_findings_are_read_without_values_and_item_numbers() -> None:
    report = dciodvfy.parse(_OUTPUT, 1)
    assert report.iod == "CTImage"
    assert report.complete
    assert report.findings == Counter(
        {
            Finding("Error", "/PatientWeight(0010,1030)", "Value is zero"): 1,
            Finding(
                "Error",
                "/ReferencedStudySequence(0008,1110)/ReferencedSOPInstanceUID(0008,1155)",
                "Missing attribute for Type 1 Required - Module=<SOPInstanceReferenceMacro>",
            ): 1,
            Finding(
                "Error",
                "/SOPInstanceUID(0008,0018)",
                "Value invalid for this VR [UI] = <> - Character invalid for this VR = ''",
            ): 2,
            Finding(
                "Warning",
                "/Laterality(0020,0060)",
                "is only permitted to be empty when actually unknown",
            ): 1,
            Finding("Error", "/ImageComments(0020,4000)", "Value invalid for this VR [LT] = <>"): 1,
        }
    )
    assert len(report.errors()) == 4
    assert len(report.warnings()) == 1


def test_an_abort_or_a_read_failure_leaves_no_baseline() -> None:
    aborted = dciodvfy.parse("dciodvfy: attrothr.cc:46: ...: Assertion `bitsallocated <= 32' failed.\n", -6)
    assert not aborted.complete
    assert Finding("Error", "", "dciodvfy aborted (signal 6)") in aborted.findings
    cut = dciodvfy.parse("Error - Dicom dataset read failed\n", 1)
    assert not cut.complete


_TEXT = st.text(st.characters(codec="ascii", exclude_characters="<>'\n\r"), max_size=30)


@given(_TEXT, _TEXT, st.integers(1, 99), st.integers(1, 99))
def test_two_values_of_one_finding_read_the_same(first: str, second: str, item: int, other_item: int) -> None:
    def line(value: str, number: int) -> str:
        return (
            f"Error - </OtherPatientIDsSequence(0010,1002)[{number}]/PatientID(0010,0020)[1]> - Value invalid for "
            f"this VR [LO] = <{value}> - Character invalid for this VR = '{value[:1]}' (0x{ord(value[:1] or ' '):x})"
        )

    assert dciodvfy.normalise(line(first, item)) == dciodvfy.normalise(line(second, other_item))
    finding = dciodvfy.normalise(line(first, item))
    assert finding is not None
    assert dciodvfy.normalise(str(finding)) == finding
