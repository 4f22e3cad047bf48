"""`ingestd check-xnat`: what each configured XNAT server will do with ingestd's deliveries (`checks`)."""

from ingestd.check_xnat.checks import Finding, check_xnat, exit_status, iter_lines, parse_version

__all__ = ["Finding", "check_xnat", "exit_status", "iter_lines", "parse_version"]
