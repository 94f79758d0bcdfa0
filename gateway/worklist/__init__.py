"""Modality worklists: order intake (files, HL7 over MLLP), build, MWL C-FIND, MPPS."""
