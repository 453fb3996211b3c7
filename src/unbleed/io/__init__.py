"""Files: PNGs with metadata and records, plots, attention pictures."""
