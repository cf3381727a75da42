"""Small text helpers for messages."""
from __future__ import annotations

from typing import Iterable


def format_ranks(ranks: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (sorted, duplicates dropped)."""
    ordered = sorted(set(ranks))
    out, start = [], None
    for i, r in enumerate(ordered):
        if start is None:
            start = r
        if i + 1 == len(ordered) or ordered[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def rank_list(ranks: Iterable[int]) -> str:
    """[2] -> 'rank 2'; [0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    ordered = sorted(set(ranks))
    return f"rank{'s' if len(ordered) != 1 else ''} {format_ranks(ordered)}"


def node_list(nodes: Iterable[int]) -> str:
    """[1] -> 'node 1'; [1, 2] -> 'nodes 1-2'."""
    ordered = sorted(set(nodes))
    return f"node{'s' if len(ordered) != 1 else ''} {format_ranks(ordered)}"


def counted(n: int, word: str, plural: str = "") -> str:
    """(1, "GPU") -> '1 GPU'; (2, "GPU") -> '2 GPUs'; (2, "process", "processes") -> '2 processes'."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"
