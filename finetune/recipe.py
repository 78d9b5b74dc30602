"""The training recipe: per-dataset presets, optimizer parameter groups, schedule, loss and mixup.

Sources, cited as data:
- the paper's appendix Table 3 (the grid searched: AdamW; lr {0.2, 0.1, 0.05, 0.01, 0.005, 0.001,
  0.0001}; weight decay {0.05, 0.01, 0.005, 0.001, 0}; dropout {0, 0.1, 0.3, 0.5, 0.7}; batch
  {256, 128, 32}; cosine decay; 100 epochs; 10 warm-up epochs) and Sec. 4.1 (VTAB: resize to
  224², random flip; FGVC: random flip and random resized crop to 224²);
- the official code, github.com/zstarN70/RLRR at commit 99d2087: the per-dataset values of
  `RLRRDatasets/VTABConfig.py` and `RLRRDatasets/FGVCConfig.py` (lr, weight_decay, drop_path,
  batch_size, simple_aug = random flip, drop_last; every config also sets min_lr 1e-8 and
  warmup_lr 1e-7), the scripts' argparse defaults (lr 3e-3, weight decay 5e-5, seed 42, warm-up
  10 and cooldown 10 epochs, VTAB 100 and FGVC 50 epochs), `models/networks.py` `get_parameters`
  (no weight decay on names containing 'bias' or 'norm') and `train_fgvc_aug.py` (mixup 0.8,
  cutmix 1.0, switch prob 0.5, label smoothing 0.1, for the AugReg runs).
The paper does not print the per-dataset values; the official configs are the only published ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import rlrr
from finetune.errors import RecipeError


@dataclass(frozen=True)
class DatasetRecipe:
    """One dataset's values from the official configuration files (data, not tuned here)."""

    benchmark: str  # "vtab1k" or "fgvc"
    official: str  # the key in the official DATA_CONFIGS (also its data folder name)
    num_classes: int
    lr: float
    weight_decay: float
    drop_path: float  # stochastic depth rate ("Dropout Rate" of Table 3)
    flip: bool  # random horizontal flip (VTAB: `simple_aug`; FGVC: always)
    drop_last: bool = False  # FGVC: NABirds only
    batch_size: int = 32  # every official config


_V, _F = "vtab1k", "fgvc"
# Keys are the dataset names of zoo.BENCHMARKS; `official` is the official code's. Order: the paper's Table 2 / Table 1.
DATASETS: dict[str, DatasetRecipe] = {
    "cifar100": DatasetRecipe(_V, "cifar", 100, 3e-3, 5e-5, 0.1, False),
    "caltech101": DatasetRecipe(_V, "caltech101", 102, 1e-3, 5e-5, 0.1, False),
    "dtd": DatasetRecipe(_V, "dtd", 47, 2e-3, 5e-5, 0.1, True),
    "flowers102": DatasetRecipe(_V, "oxford_flowers102", 102, 3e-3, 5e-2, 0.3, False),
    "pets": DatasetRecipe(_V, "oxford_iiit_pet", 37, 1e-3, 5e-5, 0.1, True),
    "svhn": DatasetRecipe(_V, "svhn", 10, 5e-3, 5e-5, 0.3, False),
    "sun397": DatasetRecipe(_V, "sun397", 397, 1e-3, 5e-5, 0.1, False),
    "patch_camelyon": DatasetRecipe(_V, "patch_camelyon", 2, 3e-3, 5e-2, 0.3, True),
    "eurosat": DatasetRecipe(_V, "eurosat", 10, 1e-3, 5e-5, 0.1, True),
    "resisc45": DatasetRecipe(_V, "resisc45", 45, 3e-3, 5e-5, 0.0, False),
    "retinopathy": DatasetRecipe(_V, "diabetic_retinopathy", 5, 5e-3, 5e-5, 0.1, True),
    "clevr_count": DatasetRecipe(_V, "clevr_count", 8, 5e-3, 5e-5, 0.5, True),
    "clevr_distance": DatasetRecipe(_V, "clevr_dist", 6, 1e-2, 5e-5, 0.2, True),
    "dmlab": DatasetRecipe(_V, "dmlab", 6, 5e-3, 5e-5, 0.3, True),
    "kitti_distance": DatasetRecipe(_V, "kitti", 4, 3e-3, 5e-2, 0.3, True),
    "dsprites_location": DatasetRecipe(_V, "dsprites_loc", 16, 1e-2, 5e-5, 0.1, False),
    "dsprites_orientation": DatasetRecipe(_V, "dsprites_ori", 16, 5e-3, 5e-5, 0.1, False),
    "smallnorb_azimuth": DatasetRecipe(_V, "smallnorb_azi", 18, 5e-3, 5e-2, 0.3, False),
    "smallnorb_elevation": DatasetRecipe(_V, "smallnorb_ele", 9, 1e-3, 5e-5, 0.3, True),
    "cub_200_2011": DatasetRecipe(_F, "CUB_200_2011", 200, 3e-3, 5e-2, 0.1, True),
    "nabirds": DatasetRecipe(_F, "NABirds", 555, 5e-4, 5e-2, 0.3, True, drop_last=True),
    "oxford_flowers": DatasetRecipe(_F, "OxfordFlowers", 102, 3e-3, 5e-2, 0.2, True),
    "stanford_dogs": DatasetRecipe(_F, "StanfordDogs", 120, 1e-4, 5e-2, 0.0, True),
    "stanford_cars": DatasetRecipe(_F, "StanfordCars", 196, 3e-3, 5e-2, 0.2, True),
}

# Without a dataset preset: the official scripts' argparse defaults and Table 3's schedule.
DEFAULT_LR, DEFAULT_WEIGHT_DECAY, DEFAULT_BATCH = 3e-3, 5e-5, 32
DEFAULT_EPOCHS, PAPER_WARMUP_EPOCHS = 100, 10
MIN_LR, WARMUP_LR = 1e-8, 1e-7  # every official config
MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode="batch")  # train_fgvc_aug.py
MIXUP_LABEL_SMOOTHING = 0.1  # train_fgvc_aug.py, with mixup


def dataset_recipe(name: str) -> DatasetRecipe:
    """A dataset preset by our name or the official key (`cifar`, `CUB_200_2011`, ...)."""
    if name in DATASETS:
        return DATASETS[name]
    for recipe in DATASETS.values():
        if recipe.official == name:
            return recipe
    raise RecipeError(f"unknown dataset preset {name!r}; VTAB-1k: {', '.join(k for k, v in DATASETS.items() if v.benchmark == _V)}; "
                      f"FGVC: {', '.join(k for k, v in DATASETS.items() if v.benchmark == _F)} (or the official names)")


def default_warmup(epochs: int) -> float:
    """Table 3's 10 warm-up epochs at 100 epochs; shorter runs warm up for a tenth of their epochs."""
    return min(float(PAPER_WARMUP_EPOCHS), epochs / 10)


# --- parameter groups --------------------------------------------------------------------------

NO_DECAY_ADAPTER = ("rlrr_shift",)  # the official shift_bias / ssf_shift_*: shifts never decay


def decays(name: str, param: nn.Parameter, adapter_kind: str | None) -> bool:
    """Whether a trainable parameter gets weight decay, as the official `get_parameters`.

    Official names: `scale_col`/`scale_line` (our s_left/s_right) decay, `shift_bias` does not
    ('bias'), the norms' `ssf_scale_*_norm`/`ssf_shift_*_norm` do not ('norm'), the patch
    embedding's `ssf_scale_patch` does. We follow that, except that every shift is exempt (the
    official `ssf_shift_patch` decays: 1 vector). Outside adapters (the head): biases and 1-D
    tensors (norm scales) do not decay, matrices do.
    """
    local = name.rsplit(".", 1)[-1]
    if adapter_kind is not None:
        if local in NO_DECAY_ADAPTER:
            return False
        if local == "rlrr_scale":
            return adapter_kind != "norm"  # SSF on a norm: no decay; SSF on a linear/conv output: decay
        return True  # rlrr_s_left, rlrr_s_right
    return not (local.endswith("bias") or param.ndim <= 1)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: with and without weight decay.

    Names are the model's own (the module under DDP), in `named_parameters` order, so the
    groups are the same in every process and in a resumed run.
    """
    kind = {}
    for adapter in rlrr.adapters_of(model):
        for p in adapter.parameters(recurse=False):
            kind[id(p)] = adapter.site.kind if adapter.site.method != "ssf" else "ssf"
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p, kind.get(id(p))) else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (Table 3) over the trainable parameters, in the official code's two groups."""
    groups = [g for g in parameter_groups(model, weight_decay) if g["params"]]
    if not groups:
        raise RecipeError(f"{type(model).__name__} has no trainable parameter: nothing to fine-tune")
    return torch.optim.AdamW(groups, lr=lr)


# --- schedule ----------------------------------------------------------------------------------


def make_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int, warmup_epochs: float,
                   cooldown_epochs: float, min_lr: float, warmup_lr: float):
    """timm's CosineLRScheduler, as the official code's `create_scheduler`, stepped per update.

    Linear warm-up from `warmup_lr` over `warmup_epochs`, cosine decay to `min_lr` by the end of
    `epochs - cooldown_epochs`, then `min_lr`. The official code steps it once an epoch; per
    update gives the same curve, smoothly, and lets short runs warm up within an epoch.
    """
    from timm.scheduler import CosineLRScheduler

    total = epochs * updates_per_epoch
    t_cosine = max(1, round((epochs - cooldown_epochs) * updates_per_epoch))
    warmup_t = round(warmup_epochs * updates_per_epoch)
    if warmup_t >= t_cosine and warmup_t > 0:
        raise RecipeError(f"warm-up ({warmup_epochs} epochs) must end before the cosine decay does ({epochs} epochs - {cooldown_epochs} cooldown)")
    if total < 1:
        raise RecipeError("the schedule has no update: check --epochs and the batch size")
    return CosineLRScheduler(optimizer, t_initial=t_cosine, lr_min=min_lr, warmup_t=warmup_t, warmup_lr_init=warmup_lr,
                             t_in_epochs=False, cycle_limit=1)


# --- loss and mixup ----------------------------------------------------------------------------


def make_loss(label_smoothing: float, mixup: bool) -> nn.Module:
    """Cross-entropy (the official default); with mixup, timm's soft-target cross-entropy."""
    if not 0.0 <= label_smoothing < 1.0:
        raise RecipeError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if mixup:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def make_mixup(num_classes: int, label_smoothing: float):
    """timm's Mixup/CutMix with the official AugReg values (train_fgvc_aug.py)."""
    from timm.data import Mixup

    return Mixup(**MIXUP, label_smoothing=label_smoothing, num_classes=num_classes)


def check_finite_lr(lr: float, weight_decay: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise RecipeError(f"learning rate must be a positive number, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise RecipeError(f"weight decay must be >= 0, got {weight_decay}")
