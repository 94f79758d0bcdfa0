"""Modality worklists: orders in (files, HL7), worklist items built by a job, MWL C-FIND, MPPS."""
