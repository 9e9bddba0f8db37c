"""Words for hypotheses: the tick labels of the posterior-mode bars (paper Fig. 5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["mode_label"]


def _signed(v: int) -> str:
    return f"−{-v}" if v < 0 else str(v)  # a true minus sign reads better in figures


def mode_label(gm: GenerativeModel, assignment: Mapping[str, int]) -> str:
    """``"airplane γ=2 δ=(−1,0)"``: the category and the top pooled level's γ and δ (in
    top-level cells, (dy, dx)) of one hypothesis."""
    top = gm.hidden_levels[-1]
    dy, dx = gm.offsets[top][int(assignment[f"delta_{top}"])]
    return (f"{gm.categories[int(assignment['category'])]} γ={int(assignment[f'gamma_{top}'])} "
            f"δ=({_signed(dy)},{_signed(dx)})")  # fmt: skip
