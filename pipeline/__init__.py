"""Prune → export → engine → validate: the orchestration package.

Kept import-light on purpose: ``python -m pipeline --help`` must answer without
loading PyTorch.
"""

__version__ = "0.1.0"
