"""Model-level tests: rlrr on real timm and torchvision architectures (random weights, CPU).

What is checked, per model:
- the sites `rlrr.plan` finds, per kind, against counts derived by hand from each architecture
  (constants below, with their derivation) and, independently, against a walk of the module tree;
- fold exactness (Eq. 20): base weights and BN statistics perturbed (timm zero-inits some tensors,
  which would hide mistakes), every adapter parameter random and non-zero, eval mode, unmerged vs
  folded outputs; the adapted output must differ from the base one; after the fold no adapter
  remains and the state-dict keys are the base model's plus only the biases `fold` reports creating;
- `init="identity"` reproduces the base model;
- train/eval behaviour, class and methods survive `apply` (timm ViT with DropPath);
- optimiser steps move only adapter parameters and the trainable head;
- `copy.deepcopy` of an adapted model; rank 2; `fused_chunks=False`.

Tolerances: outputs are compared with `rtol=0, atol=REL_TOL * scale`, where `scale` is the largest
absolute value of the reference output (relative errors near zero logits are meaningless). In float32
the fold computes the same function as the forward, so the errors seen are ~0 (see the report lines
printed with `pytest -s`); REL_TOL = 1e-5 leaves room for a different GEMM path (e.g. the
nn.MultiheadAttention fast path) without hiding a wrong formula, which moves outputs by >= 1e-3.

Models are built once per session with small inputs (img 32-64, batch 2, 10 classes) and deep-copied
per test, so the whole file runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import DropPath
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torchvision.models import VisionTransformer as TVVisionTransformer

import rlrr
from export import fold, fold_with_report

REL_TOL = 1e-5  # fold / unmerged agreement, relative to the output's scale (float32)
IDENTITY_ATOL = 1e-6  # init="identity" vs base model, absolute
NON_TRIVIAL = 1e-2  # random adapters must move the output by at least this, relative to its scale
BATCH = 2
NUM_CLASSES = 10

#: largest fold error seen per model: (max abs error, max abs error / output scale), printed with -s
FOLD_ERRORS: dict[str, tuple[float, float]] = {}


# ---------------------------------------------------------------------------------------------
# Expected site counts, derived from each architecture by hand.
# ---------------------------------------------------------------------------------------------

# timm ViT-Tiny/16 and DeiT-Tiny/16 (depth 12, global_pool="token": final `norm`, fc_norm Identity):
#   linear: 12 blocks x (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) + head          = 48 + 1 = 49
#   conv:   patch_embed.proj (16x16, stride 16)                                   = 1
#   norm:   12 blocks x (norm1, norm2) + final norm                              = 24 + 1 = 25
VIT_TINY_COUNTS = {"linear": 49, "conv": 1, "norm": 25}
VIT_TINY_QKV = 12  # one fused qkv per block, 3 chunks each

# Swin-T (timm and torchvision alike), depths (2, 2, 6, 2) = 12 blocks:
#   linear: 12 blocks x (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
#           + 3 patch-merging `reduction` (before stages 2, 3, 4) + head        = 48 + 3 + 1 = 52
#   conv:   patch embedding (4x4, stride 4)                                       = 1
#   norm:   12 blocks x (norm1, norm2) + 3 patch-merging norms
#           + patch-embedding norm + final norm                                  = 24 + 3 + 1 + 1 = 29
SWIN_T_COUNTS = {"linear": 52, "conv": 1, "norm": 29}
SWIN_T_QKV = 12
# The patch-merging `reduction` Linear has no bias: its RLRR shift becomes a created bias at fold.
TIMM_SWIN_CREATED = {f"layers.{i}.downsample.reduction.bias" for i in (1, 2, 3)}
TV_SWIN_CREATED = {f"features.{i}.reduction.bias" for i in (2, 4, 6)}

# timm ConvNeXt-Atto: depths (2, 2, 6, 2) = 12 blocks, conv_mlp=True (1x1 convs, LayerNorm2d):
#   conv:   stem conv (4x4/4) + 12 blocks x (conv_dw 7x7, mlp.fc1 1x1, mlp.fc2 1x1)
#           + 3 downsample convs (2x2/2, stages 2-4)                            = 1 + 36 + 3 = 40
#   norm:   stem LayerNorm2d + 12 block norms + 3 downsample norms + head.norm  = 1 + 12 + 3 + 1 = 17
#   linear: head.fc                                                               = 1
CONVNEXT_ATTO_COUNTS = {"linear": 1, "conv": 40, "norm": 17}

# ResNet-18 (timm and torchvision): stem conv1 + 4 stages x 2 BasicBlocks x (conv1, conv2)
#   + 1x1 downsample convs in layer2, layer3, layer4 = 1 + 16 + 3 = 20 conv; fc = 1 linear;
#   BatchNorm is not an RLRR site (the paper adapts LayerNorm only): 0 norm.
RESNET18_COUNTS = {"linear": 1, "conv": 20, "norm": 0}
# ResNet-50: stem conv1 + (3 + 4 + 6 + 3) = 16 Bottlenecks x (conv1, conv2, conv3)
#   + a downsample conv in the first block of each of the 4 stages = 1 + 48 + 4 = 53 conv; fc.
RESNET50_COUNTS = {"linear": 1, "conv": 53, "norm": 0}

# torchvision ViT-B/16, 12 encoder layers, nn.MultiheadAttention (in_proj_weight is one fused
# (3D, D) tensor, not a module: one site with 3 chunks):
#   linear: 12 x (self_attention.in_proj, self_attention.out_proj, mlp.0, mlp.3) + heads.head = 49
#   conv:   conv_proj = 1;  norm: 12 x (ln_1, ln_2) + encoder.ln = 25
TV_VIT_B16_COUNTS = {"linear": 49, "conv": 1, "norm": 25}
# The same structure with num_layers=2 (the small torchvision ViT used for the numeric tests):
#   linear: 2 x 4 + 1 = 9;  conv: 1;  norm: 2 x 2 + 1 = 5
TV_VIT_SMALL_COUNTS = {"linear": 9, "conv": 1, "norm": 5}


# ---------------------------------------------------------------------------------------------
# Model registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    img: int  # input height = width
    head: str  # the module trained in full (the classifier)
    counts: dict[str, int]
    fused: int = 0  # number of fused q/k/v projections (3 chunks each)
    created: frozenset[str] = field(default_factory=frozenset)  # biases the fold must create


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw)


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kw)


def _tv_vit_small() -> nn.Module:
    return TVVisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=NUM_CLASSES)


SPECS: dict[str, Spec] = {
    "timm_vit_tiny": Spec(_timm("vit_tiny_patch16_224", img_size=64), 64, "head", VIT_TINY_COUNTS, VIT_TINY_QKV),
    "timm_deit_tiny": Spec(_timm("deit_tiny_patch16_224", img_size=64), 64, "head", VIT_TINY_COUNTS, VIT_TINY_QKV),
    # 64 px: stage grids 16, 8, 4, 2; window 4 (timm clamps it to 2 with no shift in the last stage)
    "timm_swin_t": Spec(_timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4), 64, "head", SWIN_T_COUNTS, SWIN_T_QKV, frozenset(TIMM_SWIN_CREATED)),
    "timm_convnext_atto": Spec(_timm("convnext_atto"), 64, "head", CONVNEXT_ATTO_COUNTS),
    "timm_resnet18": Spec(_timm("resnet18"), 64, "fc", RESNET18_COUNTS),
    "tv_vit_small": Spec(_tv_vit_small, 32, "heads", TV_VIT_SMALL_COUNTS, 2),
    "tv_swin_t": Spec(_tv("swin_t"), 64, "head", SWIN_T_COUNTS, SWIN_T_QKV, frozenset(TV_SWIN_CREATED)),
    "tv_resnet18": Spec(_tv("resnet18"), 64, "fc", RESNET18_COUNTS),
}
# Counted by `plan` only (no forward): too slow or redundant for the numeric tests.
PLAN_ONLY: dict[str, Spec] = {
    "timm_resnet50": Spec(_timm("resnet50"), 64, "fc", RESNET50_COUNTS),
    "tv_resnet50": Spec(_tv("resnet50"), 64, "fc", RESNET50_COUNTS),
    "tv_vit_b_16": Spec(_tv("vit_b_16"), 224, "heads", TV_VIT_B16_COUNTS, 12),
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every parameter and BN statistic: no zero-init tensor may hide a mistake."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


@functools.cache
def _base(name: str) -> nn.Module:
    spec = {**SPECS, **PLAN_ONLY}[name]
    torch.manual_seed(0)
    return perturb_(spec.build().eval())


def fresh(name: str) -> nn.Module:
    """A perturbed base model in eval mode, built once per session and deep-copied per test."""
    return copy.deepcopy(_base(name))


def inputs(name: str, seed: int = 1) -> Tensor:
    img = SPECS[name].img
    return torch.randn(BATCH, 3, img, img, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters_(model: nn.Module, seed: int = 2) -> None:
    """Every adapter parameter random and non-zero (norm scales near 1 to keep signals healthy)."""
    g = torch.Generator().manual_seed(seed)
    adapters = rlrr.adapters_of(model)
    assert adapters, "no adapters to randomise"
    for a in adapters:
        for n, p in a.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if n == "rlrr_scale":
                p.copy_(1.0 + 0.1 * noise)
            elif n in ("rlrr_s_left", "rlrr_s_right"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.1 * noise)
            assert (p != 0).all()


@torch.no_grad()
def run(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_fold_close(actual: Tensor, expected: Tensor, rel: float = REL_TOL) -> tuple[float, float]:
    """assert_close with atol relative to the reference's scale; returns (abs, relative) error."""
    scale = expected.abs().max().item()
    assert torch.isfinite(expected).all() and scale > 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale)
    return (actual - expected).abs().max().item(), rel_err(actual, expected)


def apply_quiet(model: nn.Module, **kw) -> nn.Module:
    """rlrr.apply, failing on any 'could not trace' warning (every model here must trace)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="rlrr:.*")
        return rlrr.apply(model, **kw)


def site_tensor_keys(plan: rlrr.Plan) -> set[str]:
    """State-dict keys of every tensor a site's adapter may rewrite (weight and bias)."""
    keys = set()
    for s in plan.sites:
        for attr in (s.weight, s.bias):
            if attr:
                keys.add(f"{s.module}.{attr}" if s.module else attr)
    return keys


def adapter_numel(model: nn.Module) -> int:
    return sum(p.numel() for a in rlrr.adapters_of(model) for p in a.parameters(recurse=False))


def record(name: str, err: tuple[float, float]) -> None:
    FOLD_ERRORS[name] = max(FOLD_ERRORS.get(name, (0.0, 0.0)), err, key=lambda e: e[1])


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_report(one_torch_thread):
    """One intra-op thread (tests/conftest.py); the largest fold errors printed at the end."""
    yield
    if FOLD_ERRORS:
        print("\nlargest fold error: max |folded - unmerged|, and that / max |unmerged|")
        for k, (a, r) in FOLD_ERRORS.items():
            print(f"  {k:34s} {a:.3e}  {r:.3e}")


# ---------------------------------------------------------------------------------------------
# 1. Site counts
# ---------------------------------------------------------------------------------------------


def _structural_counts(model: nn.Module) -> tuple[dict[str, int], set[str]]:
    """Counts and names derived from the module tree alone (independent of fx)."""
    counts = {"linear": 0, "conv": 0, "norm": 0}
    names: set[str] = set()
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):  # in_proj_weight: a fused linear, not a module
            counts["linear"] += 1
            names.add(f"{n}.in_proj")
        elif isinstance(m, nn.Linear):
            counts["linear"] += 1
            names.add(n)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            counts["conv"] += 1
            names.add(n)
        elif isinstance(m, nn.LayerNorm):  # timm's LayerNorm / LayerNorm2d subclass it
            counts["norm"] += 1
            names.add(n)
    return counts, names


@pytest.mark.parametrize("name", [*SPECS, *PLAN_ONLY])
def test_site_counts_match_architecture(name):
    spec = {**SPECS, **PLAN_ONLY}[name]
    model = _base(name)
    plan = rlrr.plan(model)
    assert plan.counts() == spec.counts, plan.table()
    structural, names = _structural_counts(model)
    assert structural == spec.counts  # the constants describe this very model
    assert {s.name for s in plan.sites} == names
    assert plan.not_analysed == []
    fused = [s for s in plan.sites if s.chunks != 1]
    assert len(fused) == spec.fused
    for s in plan.sites:
        is_qkv = s.name.endswith((".qkv", ".in_proj"))
        assert s.chunks == (3 if is_qkv else 1), s
        if is_qkv:
            assert s.kind == "linear" and s.shape[0] == 3 * s.shape[1]
    if name == "tv_vit_small" or name == "tv_vit_b_16":
        assert all(s.op == "nn.MultiheadAttention" for s in fused)
        assert all(s.weight == "in_proj_weight" for s in fused)
    # with the head trained in full, no site lies under it (ConvNeXt's head holds norm + fc)
    def under_head(s):
        return s.module == spec.head or s.module.startswith(spec.head + ".")

    plan_h = rlrr.plan(model, trainable=spec.head)
    in_head = [s for s in plan.sites if under_head(s)]
    assert in_head and not any(under_head(s) for s in plan_h.sites)
    assert [s.name for s in plan_h.sites] == [s.name for s in plan.sites if not under_head(s)]
    assert plan_h.trainable == [spec.head]


# ---------------------------------------------------------------------------------------------
# 2. Fold exactness with random adapters (and rank 2, fused_chunks=False: section 7)
# ---------------------------------------------------------------------------------------------


def check_fold(name: str, **options) -> tuple[float, float]:
    spec = SPECS[name]
    x = inputs(name)
    base = fresh(name)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    y_base = run(base, x)
    assert torch.isfinite(y_base).all()

    model = copy.deepcopy(base)
    plan = rlrr.plan(model, trainable=spec.head, **options)
    returned = apply_quiet(model, trainable=spec.head, **options)
    assert returned is model and type(model) is type(base)
    assert len(rlrr.adapters_of(model)) == len(plan.sites)
    randomize_adapters_(model)
    model.eval()
    y_adapted = run(model, x)

    # non-trivial: the random adapters change the function
    moved = rel_err(y_adapted, y_base)
    assert moved > NON_TRIVIAL, f"adapters barely move the output ({moved:.2e})"

    folded, report = fold_with_report(model)
    assert folded is model
    y_folded = run(folded, x)
    err = assert_fold_close(y_folded, y_adapted)
    record(name + "".join(f" {k}={v}" for k, v in options.items()), err)

    # no adapter, parametrization or rlrr_ parameter remains
    assert rlrr.adapters_of(folded) == []
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert not any("rlrr_" in n or "parametrizations" in n for n, _ in folded.named_parameters())
    assert report.sites == len(plan.sites)
    assert set(report.created) == set(spec.created)

    # state-dict keys: the base model's plus only the created biases
    sd = folded.state_dict()
    assert set(sd) == set(base_sd) | set(report.created)
    for k in report.created:
        assert isinstance(folded.get_parameter(k), nn.Parameter)
    # every tensor no site touches is bit-identical to the base; every site weight moved
    touched = site_tensor_keys(plan)
    for k, v in base_sd.items():
        if k not in touched:
            assert torch.equal(sd[k], v), k
    for s in plan.sites:
        key = f"{s.module}.{s.weight}" if s.module else s.weight
        assert not torch.equal(sd[key], base_sd[key]), f"{key} was not folded"
    return err


@pytest.mark.parametrize("name", list(SPECS))
def test_fold_exact_with_random_adapters(name):
    check_fold(name)


# ---------------------------------------------------------------------------------------------
# 3. Identity init
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_identity_init_equals_base(name):
    spec = SPECS[name]
    x = inputs(name)
    base = fresh(name)
    y_base = run(base, x)
    model = apply_quiet(copy.deepcopy(base), init="identity", trainable=spec.head).eval()
    adapters = rlrr.adapters_of(model)
    assert adapters
    torch.testing.assert_close(run(model, x), y_base, rtol=0, atol=IDENTITY_ATOL)
    # the adapters are still live: one side zero, the other not, so training can move them
    for a in adapters:
        if a.kind == "norm":
            assert torch.equal(a.rlrr_scale, torch.ones_like(a.rlrr_scale))
            assert torch.equal(a.rlrr_shift, torch.zeros_like(a.rlrr_shift))
        else:
            assert (a.rlrr_s_left != 0).any() and torch.equal(a.rlrr_s_right, torch.zeros_like(a.rlrr_s_right))
    # norms with identity init reproduce their affine exactly
    base_norms = {n: m for n, m in base.named_modules() if isinstance(m, nn.LayerNorm)}
    for n, m in model.named_modules():
        if n in base_norms and base_norms[n].weight is not None:
            assert torch.equal(m.weight, base_norms[n].weight) and torch.equal(m.bias, base_norms[n].bias)


# ---------------------------------------------------------------------------------------------
# 4. train/eval behaviour, class and methods survive apply
# ---------------------------------------------------------------------------------------------


def _vit_droppath() -> nn.Module:
    torch.manual_seed(0)
    return perturb_(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=NUM_CLASSES, drop_path_rate=0.5))


def test_train_eval_drop_path_and_methods_survive():
    model = _vit_droppath()
    cls = type(model)
    x = inputs("timm_vit_tiny")
    apply_quiet(model, trainable="head")
    randomize_adapters_(model)
    assert type(model) is cls
    # drop_path_rate 0.5 decays linearly over 12 blocks: block 0 has rate 0 (nn.Identity), 11 x 2 DropPath
    drops = [m for m in model.modules() if isinstance(m, DropPath)]
    assert len(drops) == 22 and max(d.drop_prob for d in drops) == pytest.approx(0.5)

    # flags propagate to every module, adapters and parametrizations included
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())

    # eval: deterministic
    y1, y2 = run(model, x), run(model, x)
    assert torch.equal(y1, y2)
    with torch.no_grad():
        feats = model.forward_features(x)
    assert feats.shape == (BATCH, 1 + (64 // 16) ** 2, 192)

    # train: DropPath still drops; same seed -> same output, different seed -> different output
    model.train()
    torch.manual_seed(10)
    ya = run(model, x)
    torch.manual_seed(10)
    yb = run(model, x)
    torch.manual_seed(11)
    yc = run(model, x)
    assert torch.equal(ya, yb)
    assert not torch.allclose(ya, yc)
    assert not torch.allclose(ya, y1)
    # ... and DropPath is the only source of randomness: without it, train == eval
    for d in drops:
        d.drop_prob = 0.0
    torch.manual_seed(11)
    assert_fold_close(run(model, x), y1)
    for d in drops:
        d.drop_prob = 0.5
    model.eval()

    # methods survive on the adapted model
    assert model.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"
    old_head = model.head
    n_adapters = len(rlrr.adapters_of(model))
    model.reset_classifier(5)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5
    y5 = run(model, x)
    assert y5.shape == (BATCH, 5)
    assert len(rlrr.adapters_of(model)) == n_adapters

    # eval output equals the folded model's (features, old head, new head)
    assert fold(model) is model and type(model) is cls
    with torch.no_grad():
        folded_feats = model.forward_features(x)
        assert_fold_close(folded_feats, feats)
        assert_fold_close(old_head(model.forward_head(folded_feats, pre_logits=True)), y1)
    assert_fold_close(run(model, x), y5)


# ---------------------------------------------------------------------------------------------
# 5. Optimiser steps move only adapters and the head
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm_vit_tiny", "tv_vit_small", "tv_resnet18"])
def test_optimizer_steps_touch_only_adapters_and_head(name):
    spec = SPECS[name]
    model = apply_quiet(fresh(name), trainable=spec.head)
    model.train()
    params = dict(model.named_parameters())
    is_head = {n: n.startswith(spec.head + ".") for n in params}
    is_adapter = {n: n.rsplit(".", 1)[-1].startswith("rlrr_") for n in params}
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if is_head[n] or is_adapter[n]}
    assert any(is_head.values()) and any(is_adapter.values())
    before = {n: p.detach().clone() for n, p in params.items()}

    opt = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=1e-2)
    x = inputs(name)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()

    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"trainable {n} did not move"
        else:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), f"frozen {n} changed"


# ---------------------------------------------------------------------------------------------
# 6. deepcopy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm_vit_tiny", "tv_vit_small", "tv_swin_t"])
def test_deepcopy_is_equal_and_independent(name):
    spec = SPECS[name]
    x = inputs(name)
    model = apply_quiet(fresh(name), trainable=spec.head)
    randomize_adapters_(model)
    model.eval()
    clone = copy.deepcopy(model)
    y = run(model, x)
    assert torch.equal(run(clone, x), y)

    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ptrs & {p.data_ptr() for p in clone.parameters()}
    # each bias view in the clone defers to the clone's own adapter
    clone_adapters = {id(a) for a in rlrr.adapters_of(clone)}
    views = [m for m in clone.modules() if type(m).__name__ == "BiasOf"]
    assert views and all(id(v.adapter) in clone_adapters for v in views)

    # change the clone's adapters: the clone moves, the original does not
    with torch.no_grad():
        for a in rlrr.adapters_of(clone):
            for p in a.parameters(recurse=False):
                p.add_(0.5)
    assert rel_err(run(clone, x), y) > NON_TRIVIAL
    assert torch.equal(run(model, x), y)


@pytest.mark.parametrize("which", ["fold_copy", "fold_original"])
def test_fold_of_a_deepcopy_leaves_the_other_intact(which):
    x = inputs("tv_resnet18")
    model = apply_quiet(fresh("tv_resnet18"), trainable="fc")
    randomize_adapters_(model)
    model.eval()
    y = run(model, x)
    clone = copy.deepcopy(model)
    folded, kept = (clone, model) if which == "fold_copy" else (model, clone)
    assert_fold_close(run(fold(folded), x), y)
    assert rlrr.adapters_of(kept)
    assert torch.equal(run(kept, x), y)


# ---------------------------------------------------------------------------------------------
# 7. rank 2, fused_chunks=False
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm_vit_tiny", "tv_vit_small", "tv_resnet18", "timm_convnext_atto"])
def test_rank2_folds_exactly(name):
    check_fold(name, rank=2)


def test_rank2_adapter_shapes():
    model = apply_quiet(fresh("timm_vit_tiny"), rank=2, trainable="head")
    for a in rlrr.adapters_of(model):
        if a.kind == "norm":
            continue
        out, inp = a.out_features, a.in_features
        assert a.rlrr_s_right.shape == (out, 2)
        assert a.rlrr_s_left.shape == (a.chunks, 2, inp)
        assert a.chunks == (3 if a.site.name.endswith(".qkv") else 1)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("name", ["timm_vit_tiny", "tv_vit_small"])
def test_unfused_chunks(name, rank):
    spec = SPECS[name]
    base = _base(name)
    fused_plan = rlrr.plan(base, rank=rank, trainable=spec.head)
    plain_plan = rlrr.plan(base, rank=rank, fused_chunks=False, trainable=spec.head)
    qkv = [s for s in fused_plan.sites if s.chunks == 3]
    assert len(qkv) == spec.fused
    dims = {s.shape[1] for s in qkv}
    assert len(dims) == 1
    expected_saving = spec.fused * 2 * rank * dims.pop()  # 2·r·dim per fused qkv
    assert fused_plan.adapter_parameters - plain_plan.adapter_parameters == expected_saving

    fused = apply_quiet(fresh(name), rank=rank, trainable=spec.head)
    plain = apply_quiet(fresh(name), rank=rank, fused_chunks=False, trainable=spec.head)
    assert adapter_numel(fused) == fused_plan.adapter_parameters
    assert adapter_numel(plain) == plain_plan.adapter_parameters
    assert adapter_numel(fused) - adapter_numel(plain) == expected_saving
    qkv_names = {s.name for s in qkv}
    plain_qkv = [a for a in rlrr.adapters_of(plain) if a.site.name in qkv_names]
    assert len(plain_qkv) == spec.fused
    for a in plain_qkv:
        assert a.chunks == 1 and a.rlrr_s_left.shape == (1, rank, a.in_features)
    for a in rlrr.adapters_of(fused):
        if a.site.name in qkv_names:
            assert a.chunks == 3 and a.rlrr_s_left.shape == (3, rank, a.in_features)


@pytest.mark.parametrize("name", ["timm_vit_tiny", "tv_vit_small"])
def test_unfused_folds_exactly(name):
    check_fold(name, fused_chunks=False)
