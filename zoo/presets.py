"""Named presets: how to build each backbone, where RLRR goes in it, and the paper's budgets.

A literal table (nanoGPT style). Placements follow design.md §2 and the official code:
- ViT/DeiT: RLRR on q, k, v (timm's fused `qkv`, one S_left per chunk), `attn.proj`, `mlp.fc1`,
  `mlp.fc2`; SSF on `norm1`, `norm2` and the final `norm`; SSF after the patch embedding;
- Swin: fused `qkv` with one shared S_left, `proj`, `fc1`, `fc2`, the patch-merging `reduction`;
  SSF after `norm1`, `norm2` and the final norm only;
- ResNet: every conv at rank r (kernel flattening, no shift on bias-free convs); head `fc`.
Site names are matched by full-match regexes (`rlrr.targets`), so a placement says exactly which
layers it adapts. Nothing here downloads anything: `weights`/`weights_url` are data.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field, replace

import rlrr

from zoo.errors import UnknownPresetError


@dataclass(frozen=True)
class Placement:
    """Where RLRR, SSF and full training go in one family."""

    targets: tuple[str, ...]  # RLRR sites: "re:" full-match regexes on site names (rlrr.targets)
    trainable: tuple[str, ...]  # modules trained in full and never adapted: the classifier head (zoo.classifier_name)
    ssf: tuple[str, ...] = ()  # linear/conv sites given an SSF scale and shift of their outputs instead
    config: rlrr.RLRRConfig = rlrr.RLRRConfig()  # how (fused_chunks: q, k, v as separate layers); the rank is the preset's

    def config_for(self, rank: int, **changes) -> rlrr.RLRRConfig:
        """This placement's config at `rank`, with other fields changed (`init=...`)."""
        return replace(self.config, rank=rank, **changes)

    def arguments(self, config: rlrr.RLRRConfig) -> dict:
        """Arguments of `rlrr.apply`/`rlrr.plan` for this placement with `config`."""
        return {"targets": list(self.targets), "config": config, "trainable": list(self.trainable), "ssf": list(self.ssf) or None}


@dataclass(frozen=True)
class Budget:
    """One Params entry of the paper that a preset reproduces."""

    benchmark: str  # key of zoo.datasets.BENCHMARKS: whose heads the paper averages over
    rank: int  # RLRR rank of that row (Table 12 has r = 1 and r = 10)
    params_m: float  # the paper's Params column, in millions (2 decimals)
    table: str  # where the paper prints it


@dataclass(frozen=True)
class Twin:
    """A test-size model of the same family: the same placement applies, built in milliseconds."""

    kwargs: dict = field(default_factory=dict)  # builder overrides that shrink the model (depth, width)
    img_size: int = 32  # smallest input the twin accepts
    arch: str | None = None  # another builder, where the preset's own cannot shrink (torchvision ViT)


@dataclass(frozen=True)
class Preset:
    """Everything the zoo knows about one named backbone."""

    name: str  # the model name users already know; the key of PRESETS
    library: str  # "timm" or "torchvision": which library builds it
    arch: str  # the builder: a timm model name or a torchvision.models function
    img_size: int  # input resolution of the paper's runs and of the pretrained weights
    size_arg: str | None  # the builder's keyword for the input size; None: any size works (CNNs)
    placement: Placement  # where RLRR goes (design.md §2)
    weights: str  # the pretrained tag a weight file should come from (timm tag / torchvision enum)
    weights_url: str  # where those weights are published (data only: nothing is downloaded)
    tiny: Twin  # the test-size twin used by tests/test_zoo.py
    paper: tuple[Budget, ...] = ()  # the paper's Params rows this preset reproduces (empty: none)
    rank: int = 1  # default RLRR rank: Eq. 16 is rank 1
    num_classes: int = 1000  # default head size: the builder's own default (ImageNet-1k)
    note: str = ""  # one line shown by `describe`

    def describe(self) -> str:
        paper = "; ".join(f"{b.table}: {b.params_m:.2f} M on {b.benchmark} (r={b.rank})" for b in self.paper) or "none (not in the paper)"
        return (f"{self.name}: {self.library} {self.arch}, {self.img_size}px, rank {self.rank}. {self.note}\n"
                f"  pretrained weights: {self.weights} ({self.weights_url}); not downloaded: without a local file "
                f"(weights=path) the model has random weights\n"
                f"  RLRR targets: {', '.join(self.placement.targets)}\n"
                f"  SSF: {', '.join(self.placement.ssf) or '-'}; trained in full: {', '.join(self.placement.trainable)}; "
                f"fused q/k/v chunks: {self.placement.config.fused_chunks}\n"
                f"  paper budgets: {paper}")


# --- placements (design.md §2) ----------------------------------------------------------------

VIT = Placement(  # official ViT code: separate q, k, v, out, fc1, fc2; SSF on norms and patch embedding
    targets=(r"re:blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]|norm[12])", r"re:norm"),
    trainable=("head",),
    ssf=(r"re:patch_embed\.proj",),
    config=rlrr.RLRRConfig(fused_chunks=True),
)
SWIN = Placement(  # official Swin code: fused qkv with one shared S_left; SSF on block norms + final norm
    targets=(r"re:layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]|norm[12])",
             r"re:layers\.\d+\.downsample\.reduction", r"re:norm"),
    trainable=("head.fc",),
    config=rlrr.RLRRConfig(fused_chunks=False),
)
RESNET = Placement(  # App. G: every conv, kernel flattening; BatchNorm is not an RLRR site
    targets=(r"re:conv1", r"re:layer\d\.\d+\.(conv[123]|downsample\.0)"),
    trainable=("fc",),
)
CONVNEXT = Placement(  # not in the paper: every conv and linear as RLRR, every LayerNorm SSF-style
    targets=(r"re:stem\.[01]", r"re:stages\.\d+\.downsample\.[01]",
             r"re:stages\.\d+\.blocks\.\d+\.(conv_dw|norm|mlp\.fc[12])", r"re:head\.norm"),
    trainable=("head.fc",),
)
TV_VIT = Placement(  # torchvision's ViT, placed as the official ViT code: in_proj carries q, k, v chunks
    targets=(r"re:encoder\.layers\.encoder_layer_\d+\.(self_attention\.(in_proj|out_proj)|mlp\.[03]|ln_[12])",
             r"re:encoder\.ln"),
    trainable=("heads.head",),  # the Linear inside the `heads` Sequential
    ssf=(r"re:conv_proj",),
    config=rlrr.RLRRConfig(fused_chunks=True),
)

# --- twins: tiny models of each family (tests build them in milliseconds) -----------------------

_VIT_TWIN = dict(embed_dim=32, depth=2, num_heads=2)
_SWIN_TWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
_CONVNEXT_TWIN = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
_TV_VIT_TWIN = dict(patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)

_GOOGLE_IN21K = "https://storage.googleapis.com/vit_models/imagenet21k/"  # the official code's .npz files

PRESETS: dict[str, Preset] = {p.name: p for p in (
    # --- the paper's backbones ---
    Preset("vit_base_patch16_224", "timm", "vit_base_patch16_224", 224, "img_size", VIT,
           weights="vit_base_patch16_224.orig_in21k", weights_url=_GOOGLE_IN21K + "ViT-B_16.npz",
           tiny=Twin(_VIT_TWIN, 32),
           paper=(Budget("vtab1k", 1, 0.33, "Table 2"), Budget("fgvc", 1, 0.47, "Table 3")),
           note="ViT-B/16, ImageNet-21k (the paper's main backbone)."),
    Preset("vit_large_patch16_224", "timm", "vit_large_patch16_224", 224, "img_size", VIT,
           weights="vit_large_patch16_224.orig_in21k", weights_url=_GOOGLE_IN21K + "ViT-L_16.npz",
           tiny=Twin(_VIT_TWIN, 32), paper=(Budget("vtab1k", 1, 0.82, "Table 4a"),),
           note="ViT-L/16, ImageNet-21k."),
    Preset("vit_huge_patch14_224", "timm", "vit_huge_patch14_224", 224, "img_size", VIT,
           weights="vit_huge_patch14_224.orig_in21k", weights_url=_GOOGLE_IN21K + "ViT-H_14.npz",
           tiny=Twin(_VIT_TWIN, 28), paper=(Budget("vtab1k", 1, 1.33, "Table 4b"),),
           note="ViT-H/14, ImageNet-21k (632 M parameters: about 2.5 GB in float32)."),
    Preset("swin_base_patch4_window7_224", "timm", "swin_base_patch4_window7_224", 224, "img_size", SWIN,
           weights="swin_base_patch4_window7_224.ms_in22k",
           weights_url="https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window7_224_22k.pth",
           tiny=Twin(_SWIN_TWIN, 64), paper=(Budget("vtab1k", 1, 0.41, "Table 5"),),
           note="Swin-B, ImageNet-22k; the official Swin placement (shared S_left on qkv)."),
    Preset("resnet18", "torchvision", "resnet18", 224, None, RESNET,
           weights="ResNet18_Weights.IMAGENET1K_V1", weights_url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
           tiny=Twin({}, 32),
           paper=(Budget("cifar100", 1, 0.08, "Table 12"), Budget("cifar100", 10, 0.29, "Table 12")),
           note="torchvision ResNet-18 (timm's resnet18 has the same layer names)."),
    Preset("resnet50", "torchvision", "resnet50", 224, None, RESNET,
           weights="ResNet50_Weights.IMAGENET1K_V1", weights_url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
           tiny=Twin(dict(width_per_group=8), 32),  # narrower 3x3 convs: a 4 M-parameter twin
           paper=(Budget("cifar100", 1, 0.27, "Table 12"), Budget("cifar100", 10, 0.85, "Table 12")),
           note="torchvision ResNet-50 (the official code's resnet50-19c8e357.pth is the same V1 weights)."),
    # --- neighbours (no paper budget) ---
    Preset("deit_base_patch16_224", "timm", "deit_base_patch16_224", 224, "img_size", VIT,
           weights="deit_base_patch16_224.fb_in1k", weights_url="https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
           tiny=Twin(_VIT_TWIN, 32), note="DeiT-B/16: a timm ViT, the ViT placement."),
    Preset("vit_small_patch16_224", "timm", "vit_small_patch16_224", 224, "img_size", VIT,
           weights="vit_small_patch16_224.augreg_in21k",
           weights_url="https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
           tiny=Twin(_VIT_TWIN, 32), note="ViT-S/16, ImageNet-21k (AugReg): the benchmarks' backbone."),
    Preset("convnext_base", "timm", "convnext_base", 224, None, CONVNEXT,
           weights="convnext_base.fb_in22k", weights_url="https://dl.fbaipublicfiles.com/convnext/convnext_base_22k_224.pth",
           tiny=Twin(_CONVNEXT_TWIN, 32), note="ConvNeXt-B, ImageNet-22k: every conv/linear RLRR, LayerNorms SSF-style."),
    Preset("vit_b_16", "torchvision", "vit_b_16", 224, "image_size", TV_VIT,
           weights="ViT_B_16_Weights.IMAGENET1K_V1", weights_url="https://download.pytorch.org/models/vit_b_16-c867db91.pth",
           tiny=Twin(_TV_VIT_TWIN, 32, arch="VisionTransformer"), note="torchvision ViT-B/16: the ViT placement on nn.MultiheadAttention."),
    # --- the smallest size of each timm family ---
    Preset("vit_tiny_patch16_224", "timm", "vit_tiny_patch16_224", 224, "img_size", VIT,
           weights="vit_tiny_patch16_224.augreg_in21k",
           weights_url="https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
           tiny=Twin(_VIT_TWIN, 32), note="ViT-Ti/16: the smallest ViT."),
    Preset("deit_tiny_patch16_224", "timm", "deit_tiny_patch16_224", 224, "img_size", VIT,
           weights="deit_tiny_patch16_224.fb_in1k", weights_url="https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
           tiny=Twin(_VIT_TWIN, 32), note="DeiT-Ti/16: the smallest DeiT."),
    Preset("swin_tiny_patch4_window7_224", "timm", "swin_tiny_patch4_window7_224", 224, "img_size", SWIN,
           weights="swin_tiny_patch4_window7_224.ms_in1k",
           weights_url="https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth",
           tiny=Twin(_SWIN_TWIN, 64), note="Swin-T: the smallest Swin."),
    Preset("convnext_atto", "timm", "convnext_atto", 224, None, CONVNEXT,
           weights="convnext_atto.d2_in1k",
           weights_url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/convnext_atto_d2-01bb0f51.pth",
           tiny=Twin(_CONVNEXT_TWIN, 32), note="ConvNeXt-Atto: the smallest ConvNeXt (1x1-conv MLP)."),
)}


def list_presets(pattern: str = "*") -> list[str]:
    """Preset names matching an fnmatch pattern (`"vit*"`), in table order."""
    return [n for n in PRESETS if fnmatch.fnmatchcase(n, pattern)]


def get_preset(name: str | Preset) -> Preset:
    """The preset called `name`; UnknownPresetError lists the presets (closest first)."""
    if isinstance(name, Preset):
        return name
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownPresetError(f"unknown preset {name!r}.{hint} Presets: {', '.join(PRESETS)}")
    return PRESETS[name]
