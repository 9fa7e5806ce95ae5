"""Metrics with the challenges' conventions, and challenge evaluation protocols."""
