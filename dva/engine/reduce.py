"""Tree reductions of partial sums held as futures."""

from __future__ import annotations

from distributed import Client, Future

FAN_IN = 4


def add_partials(*parts: dict) -> dict:
    """Sum dicts of arrays/numbers key by key, in the order given (lists concatenate; a key missing
    from some counts as zero there; new objects, inputs untouched)."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            total[key] = total[key] + value if key in total else value
    return total


def tree_sum(client: Client, futures: list[Future], fan_in: int = FAN_IN) -> Future:
    """One future of the sum of `futures`, in a fixed tree (the same order whatever the workers)."""
    level = list(futures)
    while len(level) > 1:
        level = [
            client.submit(add_partials, *level[i : i + fan_in], pure=False)
            if len(level[i : i + fan_in]) > 1
            else level[i]
            for i in range(0, len(level), fan_in)
        ]
    return level[0]
