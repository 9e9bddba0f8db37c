"""Argument checks shared by the data modules, each raising an error that names the problem."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["check_category", "check_count", "check_range", "check_seed", "check_size"]

MIN_SIZE, MAX_SIZE = 16, 1024


def check_category(category: object, known: Sequence[str]) -> str:
    if not isinstance(category, str) or category not in known:
        raise ValueError(f"unknown category {category!r}; known categories: {', '.join(known)}")
    return category


def check_count(name: str, n: object, *, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < lo or (hi is not None and n > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {n}")
    return n


def check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int (pixels per side), got {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size}")
    return size


def check_seed(seed: object) -> tuple[int, ...]:
    """A seed is a non-negative int or a tuple of them (as numpy's SeedSequence takes)."""
    parts = seed if isinstance(seed, tuple) else (seed,)
    if not parts or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in parts):
        raise ValueError(f"seed must be a non-negative int or a tuple of them, got {seed!r}")
    return parts


def check_range(
    name: str, value: object, *, lo: float, hi: float, strict_hi: bool = False
) -> tuple[float, float]:
    """A pair ``(a, b)`` with ``lo <= a <= b <= hi`` (``b < hi`` if ``strict_hi``)."""
    try:
        a, b = (float(x) for x in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    top_ok = b < hi if strict_hi else b <= hi
    if not (math.isfinite(a) and math.isfinite(b) and lo <= a <= b and top_ok):
        rel = "<" if strict_hi else "<="
        raise ValueError(f"{name} must satisfy {lo} <= low <= high {rel} {hi}, got ({a}, {b})")
    return a, b
