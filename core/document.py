"""A report as data: one list of sections of paragraphs, bullet lists, tables and figures.

Built once, rendered by each renderer (``pipeline.report.render``: Markdown and HTML), so the formats
cannot drift. It lives on the ground floor because every pass builds its own report section from its
own result (``Pass.report_section``) without knowing how it is rendered. Inline markup is the small
common subset both renderers understand: ```code``` and ``**bold**``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    """Cells as text; a row shorter than the header is a note spanning the rest of the row."""


@dataclass
class Figure:
    name: str
    """File name (written beside the Markdown, embedded in the HTML)."""
    alt: str
    png: bytes


Block = Union[Paragraph, Bullets, Table, Figure]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.blocks)


@dataclass
class Document:
    title: str
    preamble: list[Block] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        return [b for s in [Section("", self.preamble), *self.sections] for b in s.blocks if isinstance(b, Figure)]

    def add(self, section: Section) -> None:
        """Append a non-empty section; one with a title already present is merged into it."""
        if not section:
            return
        for s in self.sections:
            if s.title == section.title:
                s.blocks += section.blocks
                return
        self.sections.append(section)


def safe_name(text: str) -> str:
    """``text`` as a file-name part (letters, digits, ``_.-``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def png_of(fig: object) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(buf, format="png")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buf.getvalue()


def new_figure(width: float = 6.2, height: float = 3.0) -> tuple[object, object]:
    """A matplotlib (figure, axes) on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)
