"""The project's one exception family.

Every message names the offending input and what was expected, e.g.
``recipe variant 'x': sparsity 1.5 is outside [0, 1)``.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this project raises on purpose."""


class RecipeError(PipelineError):
    """A recipe (YAML or in-code) is malformed; raised before any model is loaded."""


class ModelLoadError(PipelineError):
    """A model source cannot be found or loaded."""


class DataError(PipelineError):
    """A text source is missing, unreadable or too short for the requested windows."""


class EngineUnavailable(PipelineError):
    """A backend cannot run on this machine; the orchestrator records it as a skip."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"engine '{backend}' is unavailable here: {reason}")
        self.backend = backend
        self.reason = reason


class ArtifactError(PipelineError):
    """A cached or built artifact is missing, corrupt or foreign."""


class LockedError(PipelineError):
    """A build directory or cache entry is held by another running process."""


class ResourceError(PipelineError):
    """A build would not fit in this machine's memory or disk; raised before the expensive work."""
