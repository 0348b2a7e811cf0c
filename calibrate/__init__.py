"""Calibration and evaluation data, and (later) statistics collectors. Never changes weights."""
