"""Independent reference implementations for tests: plain loops, no batching, no gathers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_loop(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[:, y, x] = x[:, y - dy, x - dx], zero outside; by explicit index loops."""
    c, h, w = x.shape
    out = torch.zeros_like(x)
    for y in range(h):
        for xx in range(w):
            sy, sx = y - dy, xx - dx
            if 0 <= sy < h and 0 <= sx < w:
                out[:, y, xx] = x[:, sy, sx]
    return out


def phi_loop(step, upper: torch.Tensor | int, gamma: int, delta: int) -> torch.Tensor:
    """φ of one hypothesis for one image, with a per-hypothesis convolution."""
    dy, dx = (int(v) for v in step.offsets[delta])
    if step.kind == "template":
        y = F.relu(step.weight[int(upper), gamma])
    elif step.kind == "conv":
        y = F.relu(F.conv2d(upper[None], step.weight[gamma], step.bias[gamma], padding=1)[0])
    else:
        h, w = step.out.height, step.out.width
        extra = (h - 2 * upper.shape[-2], w - 2 * upper.shape[-1])
        y = F.conv_transpose2d(
            upper[None], step.weight[gamma], step.bias[gamma], stride=2, padding=1,
            output_padding=extra,
        )[0]  # fmt: skip
        y = F.relu(y)
    return shift_loop(y, dy, dx)
