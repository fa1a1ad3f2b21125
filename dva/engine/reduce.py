"""Sums of the partial results of a pass."""

from __future__ import annotations


def add_partials(*parts: dict) -> dict:
    """Sum dicts of arrays/numbers key by key, in the order given (lists concatenate; new objects,
    inputs untouched)."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            total[key] = total[key] + value
    return total
