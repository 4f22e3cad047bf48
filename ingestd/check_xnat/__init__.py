"""`ingestd check-xnat`: the checks of each XNAT server (`checks`), their results (`findings`) and the dry import
of `--write-test` (`write_test`)."""

from ingestd.check_xnat.checks import check_xnat, parse_version
from ingestd.check_xnat.findings import Finding, exit_status, iter_lines

__all__ = ["Finding", "check_xnat", "exit_status", "iter_lines", "parse_version"]
