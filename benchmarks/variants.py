"""The models the benchmark compares: how each training variant and each inference model is built.

Every builder takes a fresh timm model (random weights: no model hub) and returns it ready to
train, with exactly the parameters of that method requiring grad. PEFT is imported only inside
`lora`, so the other variants' processes never pay for (or hold the memory of) transformers.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn

import rlrr

MODELS = {"vit_s16": "vit_small_patch16_224", "vit_b16": "vit_base_patch16_224", "vit_h14": "vit_huge_patch14_224",
          "vit_t16_32": "vit_tiny_patch16_224"}  # the last at 32², for the CI-size form of a run
IMAGE_SIZE = {"vit_t16_32": 32}  # input side when not 224
LINEARS = ["*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2"]
#: LoRA's targets, the same linears (a regex: a plain "proj" would also catch patch_embed.proj)
LORA_TARGETS = r".*\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$"
NUM_CLASSES = 100
#: The torch.compile backend of the compiled-kernels ablation (`rlrr.set_recompute(compile=...)`):
#: "inductor" (fused loops) by default, None for eager ops. Workers set it from their spec.
RLRR_KERNELS: str | None = "inductor"


def build(model: str, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised timm model; ViT-H keeps its 1000-class head (632 M parameters, as in the issue)."""
    torch.manual_seed(0)
    if num_classes is None:
        num_classes = 1000 if model == "vit_h14" else NUM_CLASSES
    size = {"img_size": IMAGE_SIZE[model]} if model in IMAGE_SIZE else {}
    net = timm.create_model(MODELS[model], pretrained=False, num_classes=num_classes, **size)
    with torch.no_grad():  # like trained weights: timm's init has γ = 1 and zero biases, which an
        for name, p in net.named_parameters():  # ONNX optimiser may deduplicate or drop in the base model only
            if p.dim() == 1:
                p.add_(torch.randn_like(p), alpha=0.02)
    return net


def full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains."""
    return model


def linear_probe(model: nn.Module) -> nn.Module:
    """Only the classifier head trains."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))
    return model


def dense_floor(model: nn.Module) -> nn.Module:
    """Not a method, a yardstick: every weight frozen, only the position embedding trains.

    Backward then runs dX through every block and nothing else: the dense work LoRA cannot avoid
    (its adapters need gradients down to block 0). LoRA's step minus this is LoRA's own overhead;
    this plus the weight-gradient GEMMs (task `gemm_floor`) is the least any RLRR step can cost.
    """
    for name, p in model.named_parameters():
        p.requires_grad_(name == "pos_embed")
    return model


def rlrr_paper(model: nn.Module) -> nn.Module:
    """RLRR (ours), rank 1, the paper's ViT placement: linears, every LayerNorm, SSF on the patch embedding.

    Its linears train through the library's default path: the recompute Function, native loops on CPU.
    """
    return rlrr.apply(model, LINEARS + ["norm"], trainable="head", ssf="patch_embed.proj")


def rlrr_eager(model: nn.Module) -> nn.Module:
    """Ablation: the paper's placement with the recompute path op by op (`native=False`)."""
    return rlrr.set_recompute(rlrr_paper(model), True, native=False)


def rlrr_compiled(model: nn.Module) -> nn.Module:
    """Ablation: the paper's placement with the recompute path's formula compiled into fused loops (`RLRR_KERNELS`)."""
    return rlrr.set_recompute(rlrr_paper(model), True, compile=RLRR_KERNELS or False)


def rlrr_linears(model: nn.Module) -> nn.Module:
    """RLRR on exactly LoRA's linears (no norms, no patch embedding): the like-for-like row."""
    return rlrr.apply(model, LINEARS, trainable="head")


def rlrr_parametrize(model: nn.Module) -> nn.Module:
    """Ablation: the paper's placement through parametrize alone, without the recompute path.

    W' is then built by the weight's parametrization and kept alive by F.linear until backward.
    """
    return rlrr.set_recompute(rlrr_paper(model), False)


def lora(model: nn.Module, rank: int = 8) -> nn.Module:
    """PEFT LoRA r=8 on qkv/proj/fc1/fc2, head trained in full (PEFT's modules_to_save)."""
    from peft import LoraConfig, get_peft_model  # reason: benchmark-only dependency, heavy import

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, modules_to_save=["head"])
    return get_peft_model(model, config)


class SSF(nn.Module):
    """SSF (Lian et al. 2022) as its official code does it: y * scale + shift on a layer's output.

    Wraps the layer, so the frozen layer runs unchanged and only the output is rescaled: the
    gradient of the scale is sum(dy * y), no weight-gradient GEMM.
    """

    def __init__(self, layer: nn.Module, channels: int, channel_dim: int) -> None:
        super().__init__()
        self.layer, self.channel_dim = layer, channel_dim
        self.ssf_scale = nn.Parameter(torch.ones(channels).normal_(1.0, 0.02))
        self.ssf_shift = nn.Parameter(torch.zeros(channels).normal_(0.0, 0.02))

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(x)
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return y * self.ssf_scale.view(shape) + self.ssf_shift.view(shape)


def ssf(model: nn.Module) -> nn.Module:
    """SSF baseline: scale and shift after every adapted linear, every LayerNorm and the patch embedding."""
    for p in model.parameters():
        p.requires_grad_(False)
    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith("head"):
            swaps.append((name, SSF(m, m.out_features, -1)))
        elif isinstance(m, nn.LayerNorm):
            swaps.append((name, SSF(m, m.normalized_shape[0], -1)))
        elif isinstance(m, nn.Conv2d):
            swaps.append((name, SSF(m, m.out_channels, 1)))
    for name, new in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


TRAIN_VARIANTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "full": full,
    "full_fwd_bwd": full,  # the floor: the same model, stepped without its optimizer (see NO_OPTIMIZER)
    "linear_probe": linear_probe,
    "dense_floor": dense_floor,
    "rlrr": rlrr_paper,
    "rlrr_eager": rlrr_eager,
    "rlrr_compiled": rlrr_compiled,
    "rlrr_linears": rlrr_linears,
    "rlrr_parametrize": rlrr_parametrize,
    "lora_r8": lora,
    "ssf": ssf,
}


#: Variants timed as forward + backward only: full fine-tuning's floor, the three GEMMs of every linear.
NO_OPTIMIZER = {"full_fwd_bwd"}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
