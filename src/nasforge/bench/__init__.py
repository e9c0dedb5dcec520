"""Measurement on runtimes: the one harness (``measure``, ``predict``) and system information."""
