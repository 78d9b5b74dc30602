"""A random base model that hides nothing: redraw the constant tensors a fresh init leaves behind."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def wake(model: nn.Module, seed: int = 0) -> list[str]:
    """Redraw the constant tensors of a randomly initialised model, seeded, so every layer counts.

    timm and torchvision zero-initialise some norms' gammas (ResNet), start layer scales at 1e-6
    (ConvNeXt) and leave biases and BatchNorm statistics at 0 and 1: an adapter behind them barely
    reaches the output and a broken fold could hide (design.md §5). Returns the names redrawn.
    """
    g = torch.Generator().manual_seed(seed)
    changed = []
    stats = [(n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    for name, t in [*model.named_parameters(), *stats]:  # other buffers (attention masks ...) are not weights
        if not t.is_floating_point() or t.dim() == 0 or t.numel() < 2:
            continue
        if not bool((t == t.reshape(-1)[0]).all()):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_mean":
            value = torch.randn(t.shape, generator=g) * 0.1
        elif leaf == "running_var" or (t.dim() == 1 and leaf != "bias"):  # norm gammas, layer scales
            value = torch.rand(t.shape, generator=g) + 0.5
        else:  # zero biases, zero-initialised heads
            value = torch.randn(t.shape, generator=g) * 0.02
        t.copy_(value.to(t.dtype))
        changed.append(name)
    return changed
