"""Test doubles shipped with ingestd (a fake XNAT server: `ingestd.testing.xnat`)."""
