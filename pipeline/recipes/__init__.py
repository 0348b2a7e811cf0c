"""Recipes shipped with the package (``python -m pipeline build NAME``)."""
