"""Export archives: ZIP (or folder, or JSON) of DICOM files, previews, metadata JSON and checksums."""
