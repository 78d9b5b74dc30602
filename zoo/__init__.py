"""zoo: named RLRR presets for the paper's backbones and their neighbours.

    import zoo
    zoo.list_presets()                                   # vit_base_patch16_224, swin_base_..., resnet50, ...
    model = zoo.build("vit_base_patch16_224", num_classes=100, weights="vit_b16_in21k.safetensors")
    # ... train: only the adapters and the head require grad ...
    rlrr.save_adapter(model, "cifar.safetensors", metadata=zoo.adapter_metadata(model))
    model = zoo.from_adapter("cifar.safetensors", weights="vit_b16_in21k.safetensors")

`python -m zoo.params` compares each preset's trainable-parameter budget with the paper's.
"""

from zoo.build import BuildRecord, adapter_metadata, build, build_base, build_record, from_adapter
from zoo.datasets import BENCHMARKS
from zoo.errors import AdapterMetadataError, RandomWeightsWarning, UnknownPresetError, WeightsFileError, WeightsMismatchError, ZooError
from zoo.presets import PRESETS, Budget, Placement, Preset, Twin, get_preset, list_presets
from zoo.weights import read_state_dict

__all__ = [
    "BENCHMARKS",
    "PRESETS",
    "AdapterMetadataError",
    "Budget",
    "BuildRecord",
    "Placement",
    "Preset",
    "RandomWeightsWarning",
    "Twin",
    "UnknownPresetError",
    "WeightsFileError",
    "WeightsMismatchError",
    "ZooError",
    "adapter_metadata",
    "build",
    "build_base",
    "build_record",
    "from_adapter",
    "get_preset",
    "list_presets",
    "read_state_dict",
]
