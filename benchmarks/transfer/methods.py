"""The rows of the comparison: each method, how it is built, and the learning rates swept for it.

RLRR is the fine-tuning package's own method (the preset's paper placement); the others are the
speed benchmark's builders in `benchmarks.variants`, handed to the same loop (`finetune(...,
adapt=...)`), so only the trained parameters differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from benchmarks import variants


@dataclass(frozen=True)
class Method:
    name: str  # the row's key in the results
    label: str  # the row's label in tables and the plot
    adapt: Callable[[nn.Module], nn.Module] | None  # None: RLRR at the preset's placement (finetune's own)
    lrs: tuple[float, ...] = ()  # the sweep; empty: take `lr_from`'s choice
    rank: int | None = None  # RLRR rank
    lr_from: str | None = None  # the row whose chosen lr this one uses (not swept itself)
    exports: bool = False  # fold and export every seed with `python -m export.onnx`


# One grid for every adapter method: the official per-dataset lrs span 1e-3 to 1e-2 for 100 epochs; 10 epochs want more
# (a first run with 1e-3..3e-2 found RLRR's and SSF's best at 3e-2, the grid's edge, so it reaches 1e-1, within Table 3's grid).
PEFT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rlrr", "RLRR r=1 (paper placement)", None, lrs=PEFT_LRS, rank=1, exports=True),
    Method("rlrr_r4", "RLRR r=4", None, rank=4, lr_from="rlrr", exports=True),
    Method("lora", "LoRA r=8 (PEFT)", variants.lora, lrs=PEFT_LRS),
    Method("ssf", "SSF", variants.ssf, lrs=PEFT_LRS),
    Method("linear", "linear probing", variants.linear_probe, lrs=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    Method("full", "full fine-tuning", variants.full, lrs=(1e-4, 3e-4, 1e-3, 3e-3)),
)}
