"""Fine-tuning with the paper's recipe: `python -m rlrr.finetune`, or the loop as a function.

    from rlrr.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(preset="vit_base_patch16_224", data="vtab-1k/cifar", dataset="cifar100",
                                     weights="ViT-B_16.npz", output="runs/cifar"))
    result.best_acc, result.files["best"]        # best.safetensors: adapters + head + metadata

`torchrun --nproc_per_node N -m rlrr.finetune ...` trains with DistributedDataParallel. See
docs/finetune.md.
"""

from rlrr.finetune.config import FinetuneConfig
from rlrr.finetune.data import Generated
from rlrr.finetune.errors import BatchSizeError, CheckpointError, DataError, FinetuneError, RecipeError, ResumeMismatchError
from rlrr.finetune.loop import FinetuneResult, finetune
from rlrr.finetune.recipe import DATASETS, DatasetRecipe

__all__ = [
    "DATASETS",
    "BatchSizeError",
    "CheckpointError",
    "DataError",
    "DatasetRecipe",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "Generated",
    "RecipeError",
    "ResumeMismatchError",
    "finetune",
]
