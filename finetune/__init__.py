"""Fine-tuning with the paper's recipe: `python -m finetune`, or the loop as a function.

    from finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(preset="vit_base_patch16_224", data="vtab-1k/cifar", dataset="cifar100",
                                     weights="ViT-B_16.npz", output="runs/cifar"))
    result.best_acc, result.files["best"]        # best.safetensors: adapters + head + metadata

    finetune(config, adapt=benchmarks.variants.lora)  # another method through the same loop (comparisons)

`torchrun --nproc_per_node N -m finetune ...` trains with DistributedDataParallel. See
docs/finetune.md.
"""

from finetune.config import FinetuneConfig
from finetune.data import Generated, load_data
from finetune.errors import (
    BatchSizeError,
    CheckpointError,
    DataError,
    DivergedError,
    FinetuneError,
    RecipeError,
    ResourceError,
    ResumeMismatchError,
)
from finetune.loop import FinetuneResult, finetune
from finetune.recipe import DATASETS, DatasetRecipe

__all__ = [
    "DATASETS",
    "BatchSizeError",
    "CheckpointError",
    "DataError",
    "DatasetRecipe",
    "DivergedError",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "Generated",
    "RecipeError",
    "ResourceError",
    "ResumeMismatchError",
    "finetune",
    "load_data",
]
