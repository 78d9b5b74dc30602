"""FinetuneConfig: every option of a fine-tuning run in one dataclass, and the values it resolves to.

`None` means "from the dataset preset (`dataset=`), else the default": the resolved values are
what a run records in its checkpoints and compares on `--resume`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from adapters import INITS
from finetune.data import CROPS, PROTOCOLS, Generated
from finetune.errors import BatchSizeError, RecipeError
from finetune.recipe import (
    DEFAULT_BATCH,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_WEIGHT_DECAY,
    MIN_LR,
    MIXUP_LABEL_SMOOTHING,
    WARMUP_LR,
    check_finite_lr,
    dataset_recipe,
    default_warmup,
)

AMP = ("auto", "off", "bf16", "fp16")
PROGRESS = ("auto", "bar", "lines", "none")


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Defaults are the paper's recipe (Table 3) and the official code's."""

    # model
    preset: str = "vit_base_patch16_224"  # a zoo preset (`python -c "import zoo; print(zoo.list_presets())"`)
    tiny: bool = False  # the preset's test-size twin (tests, smoke runs)
    weights: str | None = None  # local pretrained weights (.npz Google ViT, .safetensors, .pth); None: random
    rank: int | None = None  # RLRR rank; None: the preset's (1, Eq. 16)
    init: str = "paper"  # adapter init: "paper" (official, Table 10) or "identity" (output = base model)
    targets: tuple[str, ...] | None = None  # RLRR sites instead of the preset's placement (rlrr.apply targets)
    img_size: int | None = None  # input size; None: the preset's (224; the twin's 32)
    model_kwargs: dict | None = None  # builder arguments beyond the preset's (a narrower, shallower model: {"depth": 4}); recorded in the adapter files
    drop_path: float | None = None  # stochastic depth (timm models); None: the dataset preset's, else 0
    # data
    data: str | None = None  # a dataset folder (see finetune.data); None: generated data
    dataset: str | None = None  # a VTAB-1k / FGVC preset (recipe.DATASETS): lr, weight decay, batch, flip ...
    protocol: str = "tune"  # "tune": train/val; "final": train+val, evaluate on test (the official code)
    crop: str | None = None  # "resize" (VTAB), "random-resized" (FGVC, the paper), "resize-random" (official FGVC code)
    flip: bool | None = None  # random horizontal flip; None: the dataset preset's, else on (the paper)
    generated: Generated = field(default_factory=Generated)  # the generated dataset, when data is None
    workers: int | None = None  # DataLoader workers; None: 0 for generated data, else min(4, CPUs)
    # recipe
    epochs: int = DEFAULT_EPOCHS
    batch_size: int | None = None  # global batch per optimizer update (all processes, all accumulation steps)
    accum: int = 1  # gradient accumulation steps per update
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None  # None: min(10, epochs / 10), Table 3's 10 of 100
    cooldown_epochs: float = 0.0  # epochs at min_lr after the cosine (the official scripts add 10)
    min_lr: float = MIN_LR
    warmup_lr: float = WARMUP_LR
    label_smoothing: float | None = None  # None: 0 (official), or 0.1 with mixup (train_fgvc_aug.py)
    mixup: bool = False  # timm Mixup/CutMix with the official AugReg values
    drop_last: bool | None = None  # drop the last incomplete batch; None: the dataset preset's, else no
    amp: str = "auto"  # "auto": bf16 on CUDA (fp16 where bf16 is not supported), off on CPU
    device: str = "auto"  # "auto", "cpu", "cuda"
    seed: int = 42  # the official scripts' default
    # output
    output: str = "output"
    resume: str | None = None  # a checkpoint file, a run folder, or "auto" (the output folder's newest)
    force: bool = False  # start over in an output folder that holds a run
    progress: str = "auto"  # "auto" (a bar on a terminal, else lines), "bar", "lines", "none"
    log_every: int = 0  # in "lines" mode, a line every N updates (0: about ten an epoch, for epochs of 20+ updates)
    evaluate_test: bool = True  # evaluate the best checkpoint on the test split at the end, if there is one
    keep_checkpoints: int = 2  # training-state files kept (the newest and the one before)

    def validate(self) -> None:
        """Errors for values that can never work, before anything is built or read."""
        for name in ("epochs", "accum", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise (BatchSizeError if name == "accum" else RecipeError)(f"{name} must be an integer >= 1, got {value!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise BatchSizeError(f"batch size must be an integer >= 1, got {self.batch_size!r}")
        choices = {"amp": AMP, "progress": PROGRESS, "protocol": PROTOCOLS, "init": INITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise RecipeError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.crop is not None and self.crop not in CROPS:
            raise RecipeError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise RecipeError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("warmup_epochs", "cooldown_epochs", "min_lr", "warmup_lr", "drop_path"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise RecipeError(f"{name} must be >= 0, got {value}")
        if self.cooldown_epochs >= self.epochs:
            raise RecipeError(f"cooldown ({self.cooldown_epochs} epochs) leaves no epoch for the cosine decay of {self.epochs}")
        if self.drop_path is not None and self.drop_path >= 1:
            raise RecipeError(f"drop_path must be below 1, got {self.drop_path}")
        if self.model_kwargs is not None:
            if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
                raise RecipeError(f"model_kwargs must be a dict of builder arguments, got {self.model_kwargs!r}")
            try:
                json.dumps(self.model_kwargs)
            except TypeError as e:
                raise RecipeError(f"model_kwargs {self.model_kwargs!r} cannot be recorded in the adapter files (JSON): {e}") from e
        if self.dataset is not None:
            dataset_recipe(self.dataset)

    def recipe(self) -> dict:
        """The resolved recipe values: given ones, else the dataset preset's, else the defaults."""
        preset = dataset_recipe(self.dataset) if self.dataset else None
        mixup_ls = MIXUP_LABEL_SMOOTHING if self.mixup else 0.0
        values = {
            "lr": self.lr if self.lr is not None else preset.lr if preset else DEFAULT_LR,
            "weight_decay": self.weight_decay if self.weight_decay is not None else preset.weight_decay if preset else DEFAULT_WEIGHT_DECAY,
            "batch_size": self.batch_size if self.batch_size is not None else preset.batch_size if preset else DEFAULT_BATCH,
            "drop_path": self.drop_path if self.drop_path is not None else preset.drop_path if preset else 0.0,
            "flip": self.flip if self.flip is not None else preset.flip if preset else True,
            "drop_last": self.drop_last if self.drop_last is not None else preset.drop_last if preset else False,
            "warmup_epochs": self.warmup_epochs if self.warmup_epochs is not None else default_warmup(self.epochs),
            "label_smoothing": self.label_smoothing if self.label_smoothing is not None else mixup_ls,
        }
        check_finite_lr(values["lr"], values["weight_decay"])
        return values

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = list(self.targets) if self.targets is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("generated"), dict):
            values["generated"] = Generated(**values["generated"])
        if values.get("targets") is not None:
            values["targets"] = tuple(values["targets"])
        return cls(**values)


# Options that define what a run computes: a resumed run must have the same values.
RUN_FIELDS = ("preset", "tiny", "weights", "rank", "init", "targets", "img_size", "model_kwargs", "data", "dataset", "protocol", "generated",
              "epochs", "accum", "cooldown_epochs", "min_lr", "warmup_lr", "mixup", "seed")
RESOLVED_FIELDS = ("lr", "weight_decay", "batch_size", "drop_path", "flip", "drop_last", "warmup_epochs", "label_smoothing",
                   "crop", "amp", "classes")
