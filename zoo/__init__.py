"""zoo: named RLRR presets for the paper's backbones and their neighbours.

    import zoo
    zoo.list_presets()                                   # vit_base_patch16_224, swin_base_..., resnet50, ...
    model = zoo.build("vit_base_patch16_224", num_classes=100, weights="vit_b16_in21k.safetensors")
    # ... train: only the adapters and the head require grad ...
    rlrr.save_adapter(model, "cifar.safetensors", metadata=zoo.adapter_metadata(model))
    model = zoo.from_adapter("cifar.safetensors", weights="vit_b16_in21k.safetensors")

Any model by name (timm first, then torchvision; `timm:`/`torchvision:`/`tv:` prefixes, or your own
`package.module:function`), with its local base weights:

    model, source = zoo.build_model("convnext_atto", num_classes=10)
    zoo.load_into(model, "convnext_atto.safetensors")    # strict, except a head of another size
    zoo.classifier_name(model)                           # "head.fc"

`python -m zoo.params` compares each preset's trainable-parameter budget with the paper's;
`python -m zoo.plan --model NAME` prints the sites RLRR adapts in any model.
"""

from zoo.build import BuildRecord, adapter_metadata, build, build_base, build_record, from_adapter
from zoo.datasets import BENCHMARKS
from zoo.errors import (
    AdapterMetadataError,
    RandomWeightsWarning,
    UnknownModelError,
    UnknownPresetError,
    WeightsFileError,
    WeightsMismatchError,
    ZooError,
)
from zoo.models import ModelSource, build_model, classifier_name, input_size
from zoo.presets import PRESETS, Budget, Placement, Preset, Twin, get_preset, list_presets
from zoo.weights import load_into, read_state_dict

__all__ = [
    "BENCHMARKS",
    "PRESETS",
    "AdapterMetadataError",
    "Budget",
    "BuildRecord",
    "ModelSource",
    "Placement",
    "Preset",
    "RandomWeightsWarning",
    "Twin",
    "UnknownModelError",
    "UnknownPresetError",
    "WeightsFileError",
    "WeightsMismatchError",
    "ZooError",
    "adapter_metadata",
    "build",
    "build_base",
    "build_model",
    "build_record",
    "classifier_name",
    "from_adapter",
    "get_preset",
    "input_size",
    "list_presets",
    "load_into",
    "read_state_dict",
]
