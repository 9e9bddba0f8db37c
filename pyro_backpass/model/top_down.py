"""The top-down mixture of convolutions φ, eq. (6) of the paper, and integer shifts.

One :class:`TopDownStep` generates one level from the level above it. Its kind follows the
forward step it inverts:

========== ============================ =============================================
kind       upper level                  φ for mixture component γ
========== ============================ =============================================
template   ``category`` (one-hot c)     ReLU(T[c, γ])
conv       a conv level (same size)     ReLU(conv2d(F, W_γ, padding=1) + b_γ)
unpool     a pool level (×2 size)       ReLU(conv_transpose2d(F, W_γ, stride=2) + b_γ)
========== ============================ =============================================

then a shift by δ: an integer translation with zero fill (not a roll). All K kernel sets are
applied with **one** batched convolution (:meth:`TopDownStep.phi_all`); shifts are slices of a
padded tensor (:func:`shift_all`) or per-element gathers (:func:`shift_select`).

Reference: Wang et al. 2016, eq. (6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pyro.ops.indexing import Vindex
from torch import nn

from pyro_backpass.levels import LevelSpec

__all__ = [
    "StepKind",
    "TopDownStep",
    "interleave_phases",
    "offset_grid",
    "phase_windows",
    "shift_all",
    "shift_select",
    "step_kind",
    "unpool_phases",
]

StepKind = Literal["template", "conv", "unpool"]


def step_kind(upper: LevelSpec) -> StepKind:
    """The kind of the top-down step *from* ``upper`` to the level below it."""
    return {"category": "template", "pool": "unpool", "conv": "conv"}[upper.kind]


def offset_grid(radius: int) -> list[tuple[int, int]]:
    """All (dy, dx) in {−r..r}², row-major (dy, then dx)."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def _pad_of(offsets: torch.Tensor) -> int:
    return max((abs(v) for pair in offsets.tolist() for v in pair), default=0)


def shift_all(
    x: torch.Tensor, offsets: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Every shift of ``x``: ``(..., C, H, W)`` → ``(..., D, C, H, W)``.

    ``out[..., d, :, y, x] = x[..., :, y − dy_d, x − dx_d]`` and 0 outside the map. ``out``: an
    optional contiguous tensor of the result's shape to write into (a reused buffer).
    """
    h, w = x.shape[-2:]
    p = _pad_of(offsets)
    if p == 0 and out is None:
        return x.unsqueeze(-4)
    xp = F.pad(x, (p, p, p, p)) if p else x  # (..., C, H+2p, W+2p)
    # Window (r, s) of the padded map, r = p − dy, s = p − dx: all windows are one strided view
    # (..., C, 2p+1, 2p+1, H, W), copied out once.
    windows = xp.unfold(-2, h, 1).unfold(-2, w, 1)
    n = 2 * p + 1
    pairs = [(p - dy, p - dx) for dy, dx in offsets.tolist()]
    if pairs == [(r, c) for r in range(n) for c in range(n)]:  # every window, in order
        shape = windows.shape[:-5] + (n * n, x.shape[-3], h, w)
        out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
        out.view(shape[:-4] + (n, n) + shape[-3:]).copy_(windows.movedim(-5, -3))
        return out
    r, c = torch.tensor(pairs, device=x.device).T
    shifted = windows[..., r, c, :, :].movedim(-4, -3)  # (..., D, C, H, W)
    return shifted.contiguous() if out is None else out.copy_(shifted)


def shift_select(x: torch.Tensor, offsets: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Shift each map by its own offset: ``x (S_x, C, H, W)``, ``delta (S_d)`` → ``(S, C, H, W)``.

    ``S`` is the broadcast of ``S_x`` and ``S_d`` (Pyro's enumeration dims included).
    """
    h, w = x.shape[-2:]
    p = _pad_of(offsets)
    if p and x.dim() == 4 and delta.shape == x.shape[:1]:
        # One map per image (greedy, log_joint): pick each image's window of the padded map.
        windows = F.pad(x, (p, p, p, p)).unfold(-2, h, 1).unfold(-2, w, 1)  # (S, C, R, R, H, W)
        rows = torch.arange(x.shape[0], device=x.device)
        return windows[rows, :, p - offsets[delta, 0], p - offsets[delta, 1]]  # (S, C, H, W)
    batch = torch.broadcast_shapes(x.shape[:-3], delta.shape)
    if p == 0:
        return x.expand(batch + x.shape[-3:])
    dy, dx = offsets[delta, 0], offsets[delta, 1]  # (S_d,) each
    xp = F.pad(x, (p, p, p, p)).expand(batch + (x.shape[-3], h + 2 * p, w + 2 * p))
    rows = torch.arange(h, device=x.device) + p - dy.unsqueeze(-1)  # (S_d, H)
    idx = rows[..., None, :, None].expand(batch + (x.shape[-3], h, w + 2 * p))
    xr = xp.gather(-2, idx)  # (S, C, H, W+2p)
    cols = torch.arange(w, device=x.device) + p - dx.unsqueeze(-1)  # (S_d, W)
    idx = cols[..., None, None, :].expand(batch + (x.shape[-3], h, w))
    return xr.gather(-1, idx)  # (S, C, H, W)


# Kernel rows (or columns) of a stride-2, 4×4 transposed convolution (padding 1) that reach
# output phase a (output row 2m + a) from input rows (m − 1 + a, m + a): taps 3, 1 for a = 0 and
# 2, 0 for a = 1 (the transposed convolution's index rule y = 2i + k − 1 solved for k).
_PHASE_TAPS = ((3, 1), (2, 0))
# Input channels up to which the phase form (:func:`unpool_phases`) beats the CPU's transposed
# convolution; measured on the default model's steps, batch 32, one thread: 2.4× faster at
# 16 input channels (pool1 → conv1_1, 64 px), 1.5–2× slower at 32 and 64 (smaller maps).
_PHASE_CONV_MAX_IN = 16


def unpool_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ReLU(conv_transpose2d(x, W_γ, stride=2, padding=1) + b_γ) for every γ, by output phase:
    ``(N, 2, 2, K, C, H_in + 1, W_in + 1)``.

    The same values as the transposed convolution (up to float rounding), computed as **one**
    ordinary 2×2 convolution (padding 1) with the four output phases (a, b) as extra output
    channels: each output element depends on a 2×2 window of the input, so no multiply is
    wasted, and the CPU's ordinary convolution kernels beat its transposed ones at few input
    channels (measured 3× on the default model's ``pool1 → conv1_1`` step). Output element
    ``(2m + a, 2n + b)`` is element ``(m + a, n + b)`` of phase ``(a, b)`` (:func:`phase_windows`).
    ``weight``: ``(K, C_in, C, 4, 4)``; ``bias``: ``(K, C)``; ``x``: ``(N, C_in, H_in, W_in)``.
    """
    k, c_in, c = weight.shape[:3]
    n, _, hi, wi = x.shape
    taps = torch.tensor(_PHASE_TAPS, device=weight.device)  # (a, u)
    # (K, C_in, C, a, u, b, v) -> (a, b, K, C, C_in, u, v): phase-major output channels.
    w2 = weight[:, :, :, taps][..., taps].permute(3, 5, 0, 2, 1, 4, 6)
    w2 = w2.reshape(4 * k * c, c_in, 2, 2)
    z = F.conv2d(x, w2, bias.reshape(1, k * c).expand(4, -1).reshape(-1), padding=1)
    return F.relu_(z).view(n, 2, 2, k, c, hi + 1, wi + 1)


def phase_windows(size: tuple[int, int]) -> list[tuple[int, int, slice, slice]]:
    """For each output phase ``(a, b)`` of an unpool to ``size`` ``(H, W)``: ``(a, b, rows,
    cols)``, the window of :func:`unpool_phases`'s maps that holds output ``[a::2, b::2]``."""
    h, w = size
    return [
        (a, b, slice(a, a + (h - a + 1) // 2), slice(b, b + (w - b + 1) // 2))
        for a in range(2)
        for b in range(2)
    ]


def interleave_phases(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The output maps ``(N, C', H, W)`` from phase maps ``z`` ``(N, 2, 2, C', H_in+1, W_in+1)``
    (a copy: the values are the phases' own)."""
    out = z.new_empty(z.shape[0], z.shape[3], *size)
    for a, b, rows, cols in phase_windows(size):
        out[:, :, a::2, b::2] = z[:, a, b, :, rows, cols]
    return out


class TopDownStep(nn.Module):
    """Generates level ``out`` from level ``upper`` with K kernel sets and a set of offsets.

    :param upper: spec of the level above. :param out: spec of the generated level.
    :param num_components: K, the number of kernel sets (values of γ).
    :param offsets: the (dy, dx) values of δ, in a fixed order.
    :param scale_td: σ0, the standard deviation of ``F_td`` around φ.
    """

    def __init__(
        self,
        upper: LevelSpec,
        out: LevelSpec,
        *,
        num_components: int,
        offsets: Sequence[tuple[int, int]],
        scale_td: float,
    ) -> None:
        super().__init__()
        if num_components < 1:
            raise ValueError(f"{out.name}: num_components must be >= 1, got {num_components}")
        if len(offsets) == 0:
            raise ValueError(f"{out.name}: needs at least one offset, e.g. [(0, 0)]")
        if not (math.isfinite(scale_td) and scale_td > 0):
            raise ValueError(f"{out.name}: scale_td (σ0) must be finite and > 0, got {scale_td}")
        self.kind: StepKind = step_kind(upper)
        self.upper, self.out, self.num_components = upper, out, int(num_components)
        k, c_in, c = self.num_components, upper.channels, out.channels
        if self.kind == "template":
            self.weight = nn.Parameter(torch.zeros(c_in, k, *out.shape))  # (Ncat, K, C, H, W)
            self.bias = None
        elif self.kind == "conv":
            if (upper.height, upper.width) != (out.height, out.width):
                raise ValueError(f"conv step {upper.name}->{out.name} must keep the spatial size")
            self.weight = nn.Parameter(torch.zeros(k, c, c_in, 3, 3))
            self.bias = nn.Parameter(torch.zeros(k, c))
        else:
            extra = (out.height - 2 * upper.height, out.width - 2 * upper.width)
            if not all(e in (0, 1) for e in extra):
                raise ValueError(f"unpool step {upper.name}->{out.name} must double the size")
            self.weight = nn.Parameter(torch.zeros(k, c_in, c, 4, 4))
            self.bias = nn.Parameter(torch.zeros(k, c))
        self.register_buffer("offsets", torch.tensor(list(offsets), dtype=torch.long))
        # The same list in Python, for structural checks that should cost no tensor operation
        # (the offsets are structure, fixed at construction like K).
        self.offset_list: tuple[tuple[int, int], ...] = tuple(
            (int(dy), int(dx)) for dy, dx in offsets
        )
        self.register_buffer("scale_td", torch.tensor(float(scale_td)))

    @property
    def num_offsets(self) -> int:
        return int(self.offsets.shape[0])

    def derived(self, key: str, depends: tuple, make: Callable[[], Any]) -> Any:
        """A value derived from this step's weights and offsets (e.g. inference's shifted
        templates), kept between calls while they, and the objects ``depends`` (compared by
        identity), stay the same; checked on every call, so in-place edits, ``.to(...)`` and
        new parameters all give a fresh value. ``make`` runs outside inference mode and
        autograd, so the value is a plain tensor usable in and out of both."""
        memo = self.__dict__.setdefault("_derived", {})
        kept = memo.get(key)
        if (
            kept is not None
            and len(kept[0]) == len(depends)
            and all(a is b for a, b in zip(kept[0], depends, strict=True))
            and kept[1].device == self.weight.device
            and torch.equal(kept[1], self.weight)
            and torch.equal(kept[2], self.offsets)
        ):
            return kept[3]
        with torch.inference_mode(False), torch.no_grad():
            value = make()
            memo[key] = (depends, self.weight.detach().clone(), self.offsets.clone(), value)
        return value

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-like random kernels (the scale is fixed later by the caller)."""
        with torch.no_grad():
            w = torch.randn(self.weight.shape, generator=generator)
            fan_in = 1 if self.kind == "template" else self.upper.channels * 9
            self.weight.copy_(w * math.sqrt(2.0 / fan_in))
            if self.bias is not None:
                self.bias.copy_(0.1 * torch.randn(self.bias.shape, generator=generator))

    def phi_all(self, upper: torch.Tensor, components: slice | None = None) -> torch.Tensor:
        """φ for every component (or a ``components`` slice of them), unshifted.

        ``template``: ``upper`` is a category index tensor ``(S,)`` → ``(S, K, C, H, W)``.
        ``conv``/``unpool``: ``upper`` is ``(S, C_in, H_in, W_in)`` → ``(S, K, C, H, W)``.
        """
        components = slice(None) if components is None else components
        c, h, w = self.out.shape
        if self.kind == "template":
            return F.relu(self.weight[upper][..., components, :, :, :])
        weight, bias = self.weight[components], self.bias[components]
        k = weight.shape[0]
        batch = upper.shape[:-3]
        x = upper.reshape(-1, *upper.shape[-3:])  # (N, C_in, H_in, W_in)
        if self.kind == "conv":
            # The bias rides in the convolution and the ReLU is in place: no extra passes.
            y = F.conv2d(x, weight.reshape(k * c, *weight.shape[2:]), bias.reshape(-1), padding=1)
            return F.relu_(y).reshape(batch + (k, c, h, w))
        if self.by_phases:
            z = unpool_phases(x, weight, bias).flatten(3, 4)  # (N, 2, 2, K*C, H_in+1, W_in+1)
            return interleave_phases(z, (h, w)).reshape(batch + (k, c, h, w))
        extra = (h - 2 * x.shape[-2], w - 2 * x.shape[-1])
        # (C_in, K*C, 4, 4): one transposed conv for all K kernel sets, bias included.
        weight = weight.permute(1, 0, 2, 3, 4).reshape(x.shape[1], k * c, 4, 4)
        y = F.conv_transpose2d(x, weight, bias.reshape(-1), stride=2, padding=1,
                               output_padding=extra)  # fmt: skip
        return F.relu_(y).reshape(batch + (k, c, h, w))

    @property
    def by_phases(self) -> bool:
        """Whether :meth:`phi_all` computes this unpool step by its output phases
        (:meth:`phi_phases`, few input channels) rather than a transposed convolution."""
        return self.kind == "unpool" and self.upper.channels <= _PHASE_CONV_MAX_IN

    def phi_phases(self, upper: torch.Tensor) -> torch.Tensor:
        """An unpool step's φ for every component, by output phase (:func:`unpool_phases`):
        ``(N, 2, 2, K, C, H_in + 1, W_in + 1)``, the very values :meth:`phi_all` interleaves.
        ``upper``: ``(N, C_in, H_in, W_in)``."""
        if not self.by_phases:
            raise ValueError(f"{self.out.name}: phi_phases needs an unpool step with at most "
                             f"{_PHASE_CONV_MAX_IN} input channels")  # fmt: skip
        return unpool_phases(upper, self.weight, self.bias)

    def phi_per_sample(self, upper: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Unshifted φ of one component per sample, ``(S, C, H, W)``, convolving only that one.

        :func:`phi_all` computes all K kernel sets for every sample; fitting the kernels given
        hard assignments (hard EM's M-step) needs one per sample, so samples are grouped by γ
        and each group convolved with its own kernel set. Differentiable in the kernels.
        ``upper``: category indices ``(S,)`` (template) or ``(S, C_in, H_in, W_in)``.
        """
        if self.kind == "template":
            return F.relu(self.weight[upper, gamma])
        out = None
        for k in torch.unique(gamma).tolist():
            rows = (gamma == k).nonzero().squeeze(1)
            part = self.phi_all(upper[rows], slice(k, k + 1))[:, 0]  # (S_k, C, H, W)
            if out is None:
                out = part.new_zeros((upper.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out

    def phi(
        self,
        upper: torch.Tensor,
        gamma: torch.Tensor,
        delta: torch.Tensor,
        *,
        all_k: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """φ for given (γ, δ), broadcasting all batch dims (Pyro's enumeration dims included).

        ``template``: ``upper`` is a category index tensor; else ``(S_u, C_in, H_in, W_in)``.
        ``gamma``, ``delta``: long tensors of batch shapes ``S_g``, ``S_d`` → ``(S, C, H, W)``.
        ``all_k``: ``phi_all(upper)`` when the caller has computed it already.
        """
        # One image dim (greedy, log_joint): plain indexing; Pyro's enumeration dims: Vindex.
        if self.kind == "template":
            if upper.dim() <= 1 and gamma.dim() <= 1:
                selected = F.relu(self.weight[upper, gamma])  # (S, C, H, W)
            else:
                selected = F.relu(Vindex(self.weight)[upper, gamma])
        else:
            all_k = self.phi_all(upper) if all_k is None else all_k  # (S_u, K, C, H, W)
            if all_k.dim() == 5 and gamma.dim() <= 1:
                rows = torch.arange(all_k.shape[0], device=all_k.device)
                selected = all_k[rows, gamma]  # (S_ug, C, H, W)
            else:
                selected = Vindex(all_k)[..., gamma, :, :, :]
        return shift_select(selected, self.offsets, delta)
