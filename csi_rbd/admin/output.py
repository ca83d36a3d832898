"""Plain and JSON output, shaped like Ceph's ``rbd`` tool prints them."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("plain", "json")
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(value: int) -> str:
    """``rbd``'s byte_u_t: ``0 B``, ``4 KiB``, ``1.5 GiB``, ``97.7 MiB``."""
    index = 0
    while value >= 1024 << (10 * index) and index < len(_UNITS) - 1:
        index += 1
    if index == 0:
        return f"{value} B"
    scaled = value / (1 << (10 * index))
    if value % (1 << (10 * index)) == 0:
        return f"{int(scaled)} {_UNITS[index]}"
    digits = 2 if scaled < 10 else 1 if scaled < 100 else 0
    text = f"{scaled:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{scaled:.0f}"
    return f"{text} {_UNITS[index]}"


def yes_no(flag: bool) -> str:
    return "yes" if flag else ""


def json_bool(flag: bool) -> str:
    """``rbd`` prints some flags as the strings "true"/"false" in JSON; so do we."""
    return "true" if flag else "false"


@dataclass(frozen=True)
class Column:
    heading: str
    right: bool = False


def table(columns: Sequence[Column], rows: Sequence[Sequence[object]]) -> str:
    """Columns two spaces apart; headings left-aligned, right columns right-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [
        max([len(column.heading), *(len(row[i]) for row in cells)])
        for i, column in enumerate(columns)
    ]
    lines = ["  ".join(c.heading.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for row in cells:
        lines.append(
            "  ".join(
                cell.rjust(w) if c.right else cell.ljust(w)
                for c, w, cell in zip(columns, widths, row, strict=True)
            )
        )
    return "\n".join(line.rstrip() for line in lines)


class Output:
    """Where a command's result goes: stdout, as plain text or JSON."""

    def __init__(self, fmt: str = "plain", pretty: bool = False) -> None:
        self.format = "json" if pretty else fmt
        self.pretty = pretty

    @property
    def is_json(self) -> bool:
        return self.format == "json"

    def show(self, data: Any, plain: str) -> None:
        """Print ``data`` as JSON in JSON mode, else ``plain`` (nothing if it is empty)."""
        text = json.dumps(data, indent=4 if self.pretty else None) if self.is_json else plain
        if text:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
