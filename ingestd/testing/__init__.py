"""Test doubles shipped with ingestd (a fake XNAT server: `ingestd.testing.fake_xnat`)."""
