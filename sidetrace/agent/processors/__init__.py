"""Processors applied to every accepted trace request: resource, redaction, span metrics."""
