"""Regulatory report intake: report templates, file reading and validation of submitted reports."""
