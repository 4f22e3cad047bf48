"""dicom3tools' `dciodvfy -new`: run it on one file and read its report as comparable findings.

dciodvfy checks an instance against the IOD its SOP Class names (module by module: Type 1/2/1C/2C, enumerated
values, VRs) and prints one line per finding on stderr, e.g.

    Error - </ReferencedStudySequence(0008,1110)[1]/ReferencedSOPInstanceUID(0008,1155)> - Missing attribute ...
    Warning - </PatientWeight(0010,1030)[1]> - Value is zero

A finding is made comparable between an input and its de-identified output by taking out what differs between
the two by design: values (`= <...>`, `should be <...>`, the offending character) and the items' and values'
numbers in the element path (`[1]`), since removing an item renumbers the ones after it. What is left is the
element path by keyword and tag, and the message with its module. Findings are counted (a Counter), so an error
that appears in one more item than before still counts as new.

dciodvfy (dicom3tools 2022) does not inflate Deflated Explicit VR Little Endian: such a file is validated as DCMTK's
`dcmconv +te` writes it, explicit VR little endian, the data set unchanged (whether the deflated bytes parse is
tests/test_deid_corpus.py's dcmdump check).

A report is `complete` when dciodvfy read the whole file: it did not abort (it asserts on 32-bit pixel data) and
printed no read failure. An incomplete report of an input says little about what the input lacks, so there is
no baseline to compare an output against.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = ["Finding", "Report", "parse", "validate"]

_LINE = re.compile(r"^(?P<severity>Error|Warning) - (?:<(?P<path>/[^>]*)> - )?(?P<message>.*)$")
_NUMBER = re.compile(r"\[\d+\]")
_VALUE = re.compile(r"(=|should be|expected) <[^>]*>?")  # a value; a value with a newline is cut at the line end
_CHARACTER = re.compile(r"= '.*?' \(0x[0-9a-fA-F]+\)")
_READ_FAILED = ("read failed", "giving up", "Tags out of order")


@dataclass(frozen=True, order=True)
class Finding:
    severity: str  # "Error" or "Warning"
    path: str  # "/ReferencedStudySequence(0008,1110)/ReferencedSOPInstanceUID(0008,1155)", "" for the file
    message: str

    def __str__(self) -> str:
        return f"{self.severity} - <{self.path}> - {self.message}" if self.path else f"{self.severity} - {self.message}"


@dataclass
class Report:
    iod: str  # the IOD dciodvfy chose ("CTImage"), "" when it found none
    complete: bool
    findings: Counter[Finding] = field(default_factory=Counter)

    def errors(self) -> Counter[Finding]:
        return Counter({f: n for f, n in self.findings.items() if f.severity == "Error"})

    def warnings(self) -> Counter[Finding]:
        return Counter({f: n for f, n in self.findings.items() if f.severity == "Warning"})


def normalise(line: str) -> Finding | None:
    """One line of dciodvfy's output as a finding without values or item numbers; None when it is not one."""
    match = _LINE.match(line.rstrip())
    if match is None:
        return None
    path = _NUMBER.sub("", match["path"] or "")
    message = _CHARACTER.sub("= ''", _VALUE.sub(r"\1 <>", match["message"])).strip()
    return Finding(match["severity"], path, message)


def parse(output: str, returncode: int) -> Report:
    """dciodvfy's combined output and exit status as a report. A negative status (killed by a signal: dciodvfy
    aborts on an assertion) is an Error finding of its own and makes the report incomplete."""
    report = Report(iod="", complete=returncode >= 0)
    for line in output.splitlines():
        finding = normalise(line)
        if finding is None:
            if not report.iod and re.fullmatch(r"[A-Za-z0-9]+", line.strip()):
                report.iod = line.strip()
            continue
        report.findings[finding] += 1
        if finding.severity == "Error" and any(text in finding.message for text in _READ_FAILED):
            report.complete = False
    if returncode < 0:
        report.findings[Finding("Error", "", f"dciodvfy aborted (signal {-returncode})")] += 1
    return report


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        check=False,
        timeout=timeout,
    )


def validate(path: Path, scratch: Path, timeout: float = 120) -> Report:
    """`dciodvfy -new path`, parsed; a deflated file is first inflated into `scratch` by `dcmconv +te` (removed
    after). Its exit status says only whether it found errors; the findings tell."""
    try:
        deflated = read_file_meta_info(path).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001 - what pydicom cannot read, dciodvfy reads as it can
        deflated = False
    if not deflated:
        result = _run(["dciodvfy", "-new", str(path)], timeout)
        return parse(result.stdout, result.returncode)
    handle, name = tempfile.mkstemp(suffix=".dcm", prefix=".inflated-", dir=scratch)
    os.close(handle)
    inflated = Path(name)
    try:
        if _run(["dcmconv", "+te", str(path), str(inflated)], timeout).returncode != 0:
            return Report("", complete=False, findings=Counter({Finding("Error", "", "dcmconv +te cannot inflate"): 1}))
        result = _run(["dciodvfy", "-new", str(inflated)], timeout)
        return parse(result.stdout, result.returncode)
    finally:
        inflated.unlink(missing_ok=True)
