"""Data: dataset manifest and download, PMC figure extraction, VQA preparation, synthetic data, validation."""
