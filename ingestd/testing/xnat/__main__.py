"""`python -m ingestd.testing.xnat`: run the stand-in in the foreground (see `ingestd.testing.xnat.cli`)."""

from ingestd.testing.xnat.cli import main

raise SystemExit(main())
