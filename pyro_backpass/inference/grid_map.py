"""MAP of a Potts field of labels on a grid: per-location mixture indices with a lateral prior.

The paper's §4 proposes one mixture index per location, γ_l = {γ_l,i}, with "a prior term
P(γ_l) that can be viewed as spatial laterals enforcing the consistency between choices at
neighbouring spatial locations". With unary log-scores ``u_i(k)`` (a location's data score under
component k plus its n-gram link to the parent) and a Potts lateral term of strength w ≥ 0 on
the 4-neighbour grid, the MAP labelling maximises::

    E(x) = Σ_i u_i(x_i) + w · Σ_{i~j} [x_i = x_j]

(log P(γ_l) up to its normaliser, which does not depend on x). This is NP-hard in general, so
:func:`potts_grid_map` uses two well-known methods, batched over maps:

1. max-product (max-sum) loopy belief propagation with damping (Pearl 1988; the O(K) Potts
   message of Felzenszwalb & Huttenlocher 2006), decoded by each location's max-belief;
2. iterated conditional modes (Besag 1986) in red-black order — each half-sweep updates
   locations that are not neighbours of each other, so E never decreases — started from the
   BP decoding, from the unary argmax (the w = 0 optimum) and from every constant labelling
   (the optimum as w → ∞, the paper's one γ per level); the best result is kept.

So the answer is never worse than the best global (one-γ) labelling, equals the exact optimum
for w = 0 and for w large enough, and is compared with brute-force enumeration on small grids in
the tests (within 1 % of the exact optimum on 4×4 maps).

References: Wang et al. 2016, §4; Felzenszwalb & Huttenlocher, "Efficient Belief Propagation
for Early Vision", IJCV 2006; Besag, "On the Statistical Analysis of Dirty Pictures", 1986.
"""

from __future__ import annotations

import torch

__all__ = ["potts_energy", "potts_grid_map"]


def _check(unary: torch.Tensor, coupling: float) -> None:
    if not isinstance(unary, torch.Tensor) or unary.dim() != 4:
        raise ValueError(
            "unary must be a (B, H, W, K) tensor of log-scores, got "
            f"{getattr(unary, 'shape', type(unary).__name__)}"
        )
    if unary.shape[-1] < 1 or unary.shape[1] < 1 or unary.shape[2] < 1:
        raise ValueError(f"unary needs H, W, K >= 1, got shape {tuple(unary.shape)}")
    if torch.isnan(unary).any():
        raise ValueError("unary contains NaN")
    if not (isinstance(coupling, (int, float)) and coupling >= 0 and coupling < float("inf")):
        raise ValueError(f"coupling must be a finite number >= 0, got {coupling!r}")


def potts_energy(unary: torch.Tensor, labels: torch.Tensor, coupling: float) -> torch.Tensor:
    """``E(x) = Σ_i u_i(x_i) + w Σ_{i~j} [x_i = x_j]`` of labellings: ``(B,)``.

    :param unary: ``(B, H, W, K)`` log-scores.
    :param labels: ``(B, H, W)`` long labels in ``[0, K)``.
    :param coupling: w ≥ 0, the reward for each pair of equal 4-neighbours.
    """
    _check(unary, coupling)
    if labels.shape != unary.shape[:3]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != unary's {tuple(unary.shape[:3])}")
    data = unary.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(dim=(1, 2))
    same = (labels[:, 1:] == labels[:, :-1]).sum(dim=(1, 2)) + (
        labels[:, :, 1:] == labels[:, :, :-1]
    ).sum(dim=(1, 2))
    return data + coupling * same.to(unary.dtype)


def _neighbour_votes(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, H, W, K)``: how many 4-neighbours of each location carry each label."""
    one_hot = torch.nn.functional.one_hot(labels, k).to(dtype)  # (B, H, W, K)
    votes = torch.zeros_like(one_hot)
    votes[:, 1:] += one_hot[:, :-1]
    votes[:, :-1] += one_hot[:, 1:]
    votes[:, :, 1:] += one_hot[:, :, :-1]
    votes[:, :, :-1] += one_hot[:, :, 1:]
    return votes


def _icm(unary: torch.Tensor, labels: torch.Tensor, coupling: float, sweeps: int) -> torch.Tensor:
    """Red-black iterated conditional modes: a location takes the label that maximises its
    unary plus w × its equal neighbours, one colour of the checkerboard at a time (ties keep
    the current label, so E never decreases and a fixed point stops the sweeps)."""
    b, h, w, k = unary.shape
    rows = torch.arange(h, device=unary.device)[:, None]
    cols = torch.arange(w, device=unary.device)[None, :]
    colours = [((rows + cols) % 2 == c) for c in (0, 1)]  # (H, W) each
    for _ in range(sweeps):
        changed = False
        for colour in colours:
            local = unary + coupling * _neighbour_votes(labels, k, unary.dtype)
            current = local.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            best_value, best = local.max(dim=-1)
            move = colour & (best_value > current)
            if move.any():
                labels = torch.where(move, best, labels)
                changed = True
        if not changed:
            break
    return labels


def _loopy_bp(unary: torch.Tensor, coupling: float, iterations: int, damping: float):
    """Synchronous max-sum loopy BP with Potts messages; returns the max-belief labels."""
    # inc[d]: message each location receives from its neighbour in direction d
    # (0: from above, 1: from below, 2: from the left, 3: from the right), (B, H, W, K).
    inc = torch.zeros((4,) + unary.shape, dtype=unary.dtype, device=unary.device)
    for _ in range(iterations):
        belief = unary + inc.sum(0)
        new = torch.zeros_like(inc)
        # What a location sends down excludes what it received from below, and so on.
        # Potts max-sum message: m(k) = max(h(k) + w, max_l h(l)), normalised to max 0.
        for into, exclude in enumerate((1, 0, 3, 2)):
            h = belief - inc[exclude]
            msg = torch.maximum(h + coupling, h.amax(-1, keepdim=True))
            msg = msg - msg.amax(-1, keepdim=True)
            if into == 0:  # sent down: received from above by the location below
                new[0][:, 1:] = msg[:, :-1]
            elif into == 1:  # sent up
                new[1][:, :-1] = msg[:, 1:]
            elif into == 2:  # sent right
                new[2][:, :, 1:] = msg[:, :, :-1]
            else:  # sent left
                new[3][:, :, :-1] = msg[:, :, 1:]
        inc = damping * inc + (1 - damping) * new
    return (unary + inc.sum(0)).argmax(-1)


def potts_grid_map(
    unary: torch.Tensor,
    *,
    coupling: float,
    iterations: int = 30,
    damping: float = 0.5,
    sweeps: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate MAP labelling of a Potts field on the 4-neighbour grid, batched.

    :param unary: ``(B, H, W, K)`` log-scores ``u_i(k)`` (finite or −inf for a forbidden
        label; every location needs one finite label).
    :param coupling: w ≥ 0, the log-reward for each pair of equal neighbours.
    :param iterations: loopy BP rounds.
    :param damping: share of the old message kept each round, in [0, 1).
    :param sweeps: the most red-black ICM sweeps per start.
    :returns: labels ``(B, H, W)`` long and their energy ``(B,)`` (:func:`potts_energy`).

    Example::

        u = torch.randn(2, 4, 4, 3)
        labels, energy = potts_grid_map(u, coupling=0.5)
    """
    _check(unary, coupling)
    if not 0 <= damping < 1:
        raise ValueError(f"damping must be in [0, 1), got {damping!r}")
    if not torch.isfinite(unary.amax(-1)).all():
        raise ValueError("every location needs at least one label with a finite unary")
    b, h, w, k = unary.shape
    starts = [unary.argmax(-1)]
    if coupling > 0:
        starts.append(_loopy_bp(unary, coupling, iterations, damping))
        starts += [unary.new_full((b, h, w), c, dtype=torch.long) for c in range(k)]
    n = len(starts)
    labels = torch.stack(starts, 1).reshape(b * n, h, w)  # (B·n, H, W)
    big = unary.repeat_interleave(n, 0)  # (B·n, H, W, K)
    labels = _icm(big, labels, coupling, sweeps) if coupling > 0 else labels
    energy = potts_energy(big, labels, coupling).reshape(b, n)
    best = energy.argmax(1)  # first maximum: the earliest start
    rows = torch.arange(b, device=unary.device)
    return labels.reshape(b, n, h, w)[rows, best], energy[rows, best]
