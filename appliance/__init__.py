"""High-throughput DICOM storage appliance."""

__version__ = "0.1.0"
