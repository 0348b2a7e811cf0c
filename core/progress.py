"""Progress bars for long loops: shown on a terminal, silent in logs and CI."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, initial: int = 0) -> Iterable[T]:
    if os.environ.get("CI") or not sys.stderr.isatty():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True)
