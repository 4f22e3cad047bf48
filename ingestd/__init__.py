"""ingestd: a DICOM ingestion daemon for research imaging labs."""

__version__ = "0.1.0"
