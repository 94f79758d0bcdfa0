"""DICOM gateway: receives images from modalities, keeps each one durably, and hands them on."""

__version__ = "0.1.0"
