"""Arithmetic on sorted lists of (offset, length) runs."""

from __future__ import annotations


def subtract(runs: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``runs`` not covered by ``minus`` (both sorted, non-overlapping)."""
    result: list[tuple[int, int]] = []
    for offset, length in runs:
        pieces = [(offset, offset + length)]
        for m_offset, m_length in minus:
            m_end = m_offset + m_length
            next_pieces = []
            for lo, hi in pieces:
                if m_end <= lo or m_offset >= hi:
                    next_pieces.append((lo, hi))
                    continue
                if lo < m_offset:
                    next_pieces.append((lo, m_offset))
                if m_end < hi:
                    next_pieces.append((m_end, hi))
            pieces = next_pieces
        result.extend((lo, hi - lo) for lo, hi in pieces)
    return result
