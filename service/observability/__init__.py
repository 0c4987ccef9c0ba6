"""Seeing the service: request ids and access lines, metrics, and crash reports."""
