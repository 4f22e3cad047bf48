"""De-identification: DICOM PS3.15 Annex E tables, profiles and the engine that applies them."""
