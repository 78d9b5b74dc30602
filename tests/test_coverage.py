"""What `apply` covers: every weight a linear, conv or LayerNorm op reads, and how fused projections are seen.

- Over the smallest model of a sample of timm families, a forward pass under a TorchFunctionMode
  records the weight every `linear`, `conv*d` and `layer_norm` call receives; after `apply` none of
  them may be a raw base parameter (each is adapted, or computed by the model itself, as StdConv's).
  This is independent of the fx tracing `apply` uses to find sites.
- PoolFormerV2's bias-free LayerNorms (timm's LayerNorm2dNoBias, a functional call with bias=None)
  are adapted: scale into γ, the shift as a created bias; the fold is exact.
- A projection's chunks come from the graph: timm ViT/Swin/BEiT/EVA `qkv` (3), PVT's `kv` (2),
  torchvision's `in_proj` by module type; a `kv`-named layer whose output is not split gets one
  S_left; `chunks=` overrides.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

import rlrr
from export import fold_with_report

# (timm name, builder overrides, image size): the smallest of each family, shrunk where timm allows
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(depth=2, img_size=32), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 2, 2), window_size=4, img_size=64), 64),
    "beit": ("beit_base_patch16_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=32), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=1, img_size=28), 28),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)), 32),
    "poolformerv2": ("poolformerv2_s12", dict(), 32),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 64),
    "resnet": ("resnet18", dict(), 32),
    "mobilenetv3": ("mobilenetv3_small_050", dict(), 32),
}

_WEIGHT_ARG = {F.linear: 1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1, F.layer_norm: 2, torch.layer_norm: 2}


class WeightsRead(TorchFunctionMode):
    """Records the weight tensor of every linear, conv and layer_norm call."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        position = _WEIGHT_ARG.get(func)
        if position is not None:
            weight = args[position] if len(args) > position else kwargs.get("weight")
            if weight is not None:
                self.weights.append((getattr(func, "__name__", str(func)), weight))
        return func(*args, **kwargs)


def build(family: str) -> tuple[nn.Module, torch.Tensor]:
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    return model, torch.randn(2, 3, size, size)


def raw_weights_read(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The base parameters that linear, conv and layer_norm calls read directly in a forward pass."""
    base = {id(p): n for n, p in model.named_parameters()}
    reads = WeightsRead()
    with torch.no_grad(), reads:
        model(x)
    assert reads.weights, "the forward called no linear, conv or layer_norm"
    return sorted({f"{op}: {base[id(w)]}" for op, w in reads.weights if id(w) in base})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_weight_a_linear_conv_or_layernorm_reads_is_adapted(family: str) -> None:
    model, x = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rlrr.apply(model)
    raw = raw_weights_read(model, x)
    assert raw == [], f"{family}: ops read base parameters that apply did not adapt: {raw}"


def test_the_coverage_check_sees_layers_left_out() -> None:
    model, x = build("vit")
    rlrr.apply(model, "linear")
    raw = raw_weights_read(model, x)
    assert "layer_norm: norm.weight" in raw and "conv2d: patch_embed.proj.weight" in raw


def _perturb_(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_poolformerv2_bias_free_layernorms_are_adapted_with_a_created_bias() -> None:
    model, x = build("poolformerv2")
    norms = {n for n, m in model.named_modules() if type(m).__name__ == "LayerNorm2dNoBias"}
    assert norms, "the model has no LayerNorm2dNoBias: the test would prove nothing"
    plan = rlrr.plan(model)
    adapted = {s.module: s for s in plan.sites if s.kind == "norm"}
    assert norms <= set(adapted)
    assert all(adapted[n].op == "F.layer_norm" and adapted[n].bias_state == "creatable" for n in norms)
    rlrr.apply(model, config=rlrr.RLRRConfig(init="paper"))
    _perturb_(model)
    with torch.no_grad():
        unmerged = model(x)
        _, report = fold_with_report(model)
        folded = model(x)
    assert {f"{n}.bias" for n in norms} <= set(report.created)
    torch.testing.assert_close(folded, unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())


@pytest.mark.parametrize("family, site, chunks, source", [
    ("vit", "blocks.0.attn.qkv", 3, "graph"),
    ("swin", "layers.0.blocks.0.attn.qkv", 3, "graph"),
    ("beit", "blocks.0.attn.qkv", 3, "graph"),
    ("eva02", "blocks.0.attn.qkv", 3, "graph"),
    ("pvt_v2", "stages.0.blocks.0.attn.kv", 2, "graph"),
])
def test_fused_projections_are_read_from_the_graph(family: str, site: str, chunks: int, source: str) -> None:
    model, _ = build(family)
    sites = {s.name: s for s in rlrr.plan(model).sites}
    assert (sites[site].chunks, sites[site].chunks_from) == (chunks, source)


def test_torchvision_in_proj_has_three_chunks_by_module_type() -> None:
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    site = next(s for s in rlrr.plan(model).sites if s.name.endswith("in_proj"))
    assert (site.chunks, site.chunks_from) == (3, "module type")


class KV(nn.Module):
    """A layer named like a fused projection whose output is used whole."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.kv(x)))


def test_a_kv_named_layer_used_whole_gets_one_s_left() -> None:
    plan = rlrr.plan(KV())
    kv = next(s for s in plan.sites if s.name == "kv")
    assert (kv.chunks, kv.chunks_from) == (1, "")
    model = rlrr.apply(KV())
    assert rlrr.adapters_of(model)[0].rlrr_s_left.shape == (1, 1, 8)


def test_chunks_override_says_how_many_projections_a_layer_holds() -> None:
    plan = rlrr.plan(KV(), chunks={"kv": 2})
    kv = next(s for s in plan.sites if s.name == "kv")
    assert (kv.chunks, kv.chunks_from) == (2, "user")
    assert "2 (user)" in plan.table()


@pytest.mark.parametrize("chunks, match", [
    ({"kv": 3}, "8 output features, which 3 chunks do not divide"),
    ({"nothing.*": 2}, "match no linear site"),
    ({"kv": 0}, "count >= 1"),
    ([("kv", 2)], "must be a mapping"),
])
def test_bad_chunks_overrides_are_refused(chunks, match: str) -> None:
    model = KV()
    with pytest.raises(rlrr.ConfigError, match=match):
        rlrr.apply(model, chunks=chunks)
    assert not rlrr.adapters_of(model)
