"""The project's one exception family.

Every message names the offending input and what was expected, e.g.
``recipe variant 'x': sparsity 1.5 is outside [0, 1)``.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this project raises on purpose."""


class OptionError(ValueError):
    """An option that is out of range or does not fit the model or the data; ``key`` is the option's
    name, so the recipe check can name ``…options.<key>``."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


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


def describe(exc: BaseException) -> str:
    """One line for a person: the message of a project error, the type and message of anything else."""
    if isinstance(exc, PipelineError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (ValueError, RuntimeError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PassFailure(PipelineError):
    """A pass raised while it ran; carries the pass's recipe name for the builder's message."""

    def __init__(self, pass_name: str, cause: BaseException):
        super().__init__(f"pass '{pass_name}': {describe(cause)}")
        self.pass_name = pass_name
        self.cause = cause


class StageError(PipelineError):
    """A stage of a build failed: says which variant, stage (and engine, and pass) and why, in one line."""

    def __init__(self, stage: str, cause: BaseException, variant: str | None = None, engine: str | None = None):
        where = [f"variant '{variant}'"] if variant else []
        where.append(f"stage {stage}" + (f" ({engine})" if engine else ""))
        inner = cause
        if isinstance(cause, PassFailure):
            where.append(f"pass '{cause.pass_name}'")
            inner = cause.cause
        super().__init__(f"{', '.join(where)}: {describe(inner)}")
        self.stage, self.variant, self.engine, self.cause = stage, variant, engine, cause
        self.pass_name = cause.pass_name if isinstance(cause, PassFailure) else None
