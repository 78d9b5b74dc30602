"""The zoo: presets, their placement, the paper's budgets, local weight files, adapter round trips.

- Placement: every preset's tiny twin is built and adapted; the adapted sites must be exactly the
  ones derived here, independently of the preset's regexes, from each family's module tree
  (design.md §2), with the right kind, SSF sites and q/k/v chunking; only adapters and the head
  may require grad.
- Budgets: `zoo.params` rows agree with the paper's Params to its precision (±0.01 M) and with
  design.md's 0.327 / 0.469 / 0.409 M to ±0.001 M; the head-averaging shortcut equals a direct plan.
- Weights: .safetensors, .pth (wrapped, DDP prefix) and timm's overlay route round-trip exactly;
  a file for another model names the keys; the head is reinitialised (with a warning) when its
  size differs.
- `from_adapter` rebuilds the base model from an adapter file's metadata: identical outputs.
Models are tiny twins (milliseconds to build), so the file runs in well under two minutes on 2 cores.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import rlrr
import zoo
from rlrr.sites import effective_chunks
from zoo import params
from zoo.presets import PRESETS

NUM_CLASSES = 5
PAPER_TOL_M = 0.01  # the paper prints Params to 2 decimals (millions)
DESIGN_TOL_M = 0.001  # design.md quotes 3 decimals
# design.md §2: ViT-B/16 separate-q/k/v counting, Swin-B official placement
DESIGN_FIGURES = {("vit_base_patch16_224", "vtab1k", 1): 0.327, ("vit_base_patch16_224", "fgvc", 1): 0.469,
                  ("swin_base_patch4_window7_224", "vtab1k", 1): 0.409}
REQUIRED = ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224", "swin_base_patch4_window7_224",
            "resnet18", "resnet50", "deit_base_patch16_224", "convnext_base", "vit_b_16"]


def tiny(name: str, **kw) -> nn.Module:
    return zoo.build(name, num_classes=NUM_CLASSES, tiny=True, **kw)


def tiny_base(name: str, **kw) -> nn.Module:
    return zoo.build_base(name, num_classes=NUM_CLASSES, tiny=True, **kw)


def sample(model: nn.Module, batch: int = 2) -> torch.Tensor:
    size = zoo.build_record(model).img_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every float tensor: timm zero-inits heads and some norms, which would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model


# --- expected placements, derived from each family's module tree (not from the preset regexes) ----


def _vit_sites(m: nn.Module) -> dict[str, tuple[str, str]]:
    out = {"patch_embed.proj": ("conv", "ssf"), "norm": ("norm", "rlrr")}
    for i in range(len(m.blocks)):
        out |= {f"blocks.{i}.{n}": ("linear", "rlrr") for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
        out |= {f"blocks.{i}.{n}": ("norm", "rlrr") for n in ("norm1", "norm2")}
    return out


def _swin_sites(m: nn.Module) -> dict[str, tuple[str, str]]:
    out = {"norm": ("norm", "rlrr")}  # not patch_embed.proj, patch_embed.norm or the downsample norms
    for i, stage in enumerate(m.layers):
        if hasattr(stage.downsample, "reduction"):
            out[f"layers.{i}.downsample.reduction"] = ("linear", "rlrr")
        for j in range(len(stage.blocks)):
            out |= {f"layers.{i}.blocks.{j}.{n}": ("linear", "rlrr") for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
            out |= {f"layers.{i}.blocks.{j}.{n}": ("norm", "rlrr") for n in ("norm1", "norm2")}
    return out


def _by_type(m: nn.Module, head: str) -> dict[str, tuple[str, str]]:
    kinds = ((nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.LayerNorm, "norm"))
    return {n: (next(k for t, k in kinds if isinstance(mod, t)), "rlrr") for n, mod in m.named_modules()
            if isinstance(mod, (nn.Conv2d, nn.Linear, nn.LayerNorm)) and n != head}


def _tv_vit_sites(m: nn.Module) -> dict[str, tuple[str, str]]:
    out = {"conv_proj": ("conv", "ssf"), "encoder.ln": ("norm", "rlrr")}
    for name, _ in m.encoder.layers.named_children():
        p = f"encoder.layers.{name}"
        out |= {f"{p}.{n}": ("linear", "rlrr") for n in ("self_attention.in_proj", "self_attention.out_proj", "mlp.0", "mlp.3")}
        out |= {f"{p}.{n}": ("norm", "rlrr") for n in ("ln_1", "ln_2")}
    return out


FAMILY = {  # preset -> (expected sites, fused q/k/v projections and their chunk count)
    **{n: (_vit_sites, "attn.qkv", 3) for n in ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224",
                                                 "vit_small_patch16_224", "vit_tiny_patch16_224", "deit_base_patch16_224",
                                                 "deit_tiny_patch16_224")},
    **{n: (_swin_sites, "attn.qkv", 1) for n in ("swin_base_patch4_window7_224", "swin_tiny_patch4_window7_224")},
    **{n: (lambda m: {k: v for k, v in _by_type(m, "fc").items() if v[0] == "conv"}, None, 0) for n in ("resnet18", "resnet50")},
    **{n: (lambda m: _by_type(m, "head.fc"), None, 0) for n in ("convnext_base", "convnext_atto")},
    "vit_b_16": (_tv_vit_sites, "self_attention.in_proj", 3),
}


def test_presets_cover_the_issue_and_every_family_is_tested():
    names = zoo.list_presets()
    assert all(n in names for n in REQUIRED)
    assert set(FAMILY) == set(names)
    assert zoo.list_presets("vit_*") == [n for n in names if n.startswith("vit_")]
    for name in names:
        text = zoo.get_preset(name).describe()
        assert "random weights" in text and zoo.get_preset(name).weights in text


@pytest.mark.parametrize("name", list(PRESETS))
def test_placement_on_tiny_twin(name):
    model = tiny(name)
    preset = zoo.get_preset(name)
    expected_fn, fused, chunks = FAMILY[name]
    adapters = rlrr.adapters_of(model)
    got = {a.site.name: (a.site.kind, a.site.method) for a in adapters}
    assert got == expected_fn(model)
    for a in adapters:
        if fused and a.site.name.endswith(fused):
            assert effective_chunks(a.site, a.config) == chunks, a.site.name
    # exactly the paper's trainable set: adapter parameters and the head, nothing else
    head = preset.placement.trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_params = {n for n in trainable if n.rsplit(".", 1)[-1].startswith("rlrr_")}
    head_params = {n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in head)}
    assert trainable == adapter_params | head_params
    assert head_params and len(adapter_params) >= len(adapters)
    assert model(sample(model)).shape == (2, NUM_CLASSES)
    record = zoo.build_record(model)
    assert (record.preset, record.num_classes, record.rank, record.tiny) == (name, NUM_CLASSES, preset.rank, True)


@pytest.mark.parametrize("name", list(PRESETS))
def test_declared_head_is_the_classifier_the_zoo_finds(name):
    """A preset's trained-in-full head is the module `zoo.classifier_name` finds (weights, export, zoo.plan use it)."""
    assert zoo.get_preset(name).placement.trainable == (zoo.classifier_name(tiny_base(name)),)


# --- budgets --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_rows():
    return params.rows([n for n, p in PRESETS.items() if p.paper])


def test_every_paper_row_agrees_to_its_precision(paper_rows):
    expected = {(n, b.benchmark, b.rank) for n, p in PRESETS.items() for b in p.paper}
    assert {(r.preset, r.benchmark, r.rank) for r in paper_rows} == expected
    assert len(expected) == 9  # ViT-B x2, ViT-L, ViT-H, Swin-B, ResNet-18 x2, ResNet-50 x2
    for r in paper_rows:
        assert abs(r.ours - r.paper) <= PAPER_TOL_M, (r.preset, r.benchmark, r.rank, r.ours, r.paper)
    # rows whose rounding differs from the paper's print are exactly the explained ones
    assert {(r.preset, r.benchmark, r.rank) for r in paper_rows if not r.rounds_alike} == set(params.NOTES)


def test_design_figures(paper_rows):
    by_key = {(r.preset, r.benchmark, r.rank): r for r in paper_rows}
    for key, figure in DESIGN_FIGURES.items():
        assert abs(by_key[key].ours - figure) <= DESIGN_TOL_M, (key, by_key[key].ours)


def test_vit_b_adapter_count_by_hand(paper_rows):
    d, h = 768, 3072  # per linear r(in + out) + out; q, k, v separately; norms and patch SSF 2 x 768
    block = 3 * (d + d + d) + (d + d + d) + (d + h + h) + (h + d + d) + 2 * 2 * d
    row = next(r for r in paper_rows if r.preset == "vit_base_patch16_224")
    assert row.adapter == 12 * block + 2 * d + 2 * d == 288_768
    assert row.counts == {"linear": 48, "conv": 1, "norm": 25}


@pytest.mark.parametrize("name, num_classes, rank", [("vit_base_patch16_224", 200, 1), ("resnet18", 100, 10)])
def test_head_averaging_equals_a_direct_plan(name, num_classes, rank):
    preset = zoo.get_preset(name)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", zoo.RandomWeightsWarning)
        model = zoo.build_base(name, num_classes)
    plan = rlrr.plan(model, **preset.placement.arguments(preset.placement.config_for(rank)))
    a, b = params._head_line(name)
    adapter, _ = params._adapters(name, rank)
    assert plan.adapter_parameters + plan.trainable_parameters == adapter + a + b * num_classes


def test_params_cli_prints_every_preset(capsys, paper_rows):
    assert params.main([]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in PRESETS)
    assert "0.3268" in out and "0.4692" in out and "0.4089" in out and "note (vit_huge_patch14_224" in out


def test_params_cli_unknown_preset(capsys):
    assert params.main(["vit_bass_patch16_224"]) == 2
    assert "vit_base_patch16_224" in capsys.readouterr().err


# --- weights --------------------------------------------------------------------------------------


def _equal_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "swin_base_patch4_window7_224", "resnet18", "vit_b_16"])
def test_safetensors_round_trip(tmp_path, name):
    base = perturb_(tiny_base(name))
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    _equal_state(tiny_base(name, weights=path), base)


def test_pth_round_trip_unwraps_checkpoints(tmp_path):
    base = perturb_(tiny_base("vit_b_16"))
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in base.state_dict().items()}}, path)
    _equal_state(tiny_base("vit_b_16", weights=path), base)


def test_timm_overlay_route(tmp_path):
    base = perturb_(tiny_base("vit_base_patch16_224"))
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full load: no head warning
        loaded = tiny_base("vit_base_patch16_224", weights=path, loader="timm")
    _equal_state(loaded, base)
    with pytest.warns(UserWarning, match="head"):
        other = zoo.build_base("vit_base_patch16_224", num_classes=7, tiny=True, weights=path, loader="timm")
    sd, ref = other.state_dict(), base.state_dict()
    assert sd["head.weight"].shape == (7, 32)
    assert all(torch.equal(sd[k], ref[k]) for k in ref if not k.startswith("head."))


def test_head_of_another_size_is_reinitialised_with_a_warning(tmp_path):
    base = perturb_(tiny_base("swin_base_patch4_window7_224"))
    path = tmp_path / "base.pth"
    torch.save(base.state_dict(), path)
    with pytest.warns(UserWarning, match=r"head\.fc.*num_classes differs"):
        model = zoo.build("swin_base_patch4_window7_224", num_classes=9, tiny=True, weights=path)
    assert model.head.fc.out_features == 9
    before = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    with pytest.warns(UserWarning, match="head"):
        after = zoo.build_base("swin_base_patch4_window7_224", num_classes=9, tiny=True, weights=path)
    assert all(torch.equal(after.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("loader", ["zoo", "timm"])
def test_file_for_another_model_names_the_keys(tmp_path, loader):
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_base("resnet18").state_dict().items()}, str(path))
    with pytest.raises(zoo.WeightsMismatchError) as e:
        tiny_base("vit_base_patch16_224", weights=path, loader=loader)
    msg = str(e.value)
    assert isinstance(e.value, rlrr.RLRRError) and isinstance(e.value, ValueError)
    assert "blocks.0.attn.qkv.weight" in msg or "cls_token" in msg
    assert "conv1.weight" in msg and "fc.weight" in msg  # the file's own keys, parameters before BN statistics
    if loader == "zoo":
        assert "loader='timm'" in msg


def test_shape_mismatch_names_the_keys(tmp_path):
    path = tmp_path / "wide.safetensors"
    wide = zoo.build_base("vit_base_patch16_224", num_classes=NUM_CLASSES, tiny=True, embed_dim=48, num_heads=2)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    with pytest.raises(zoo.WeightsMismatchError, match=r"shape mismatch.*pos_embed: file \(1, 5, 48\), model \(1, 5, 32\)"):
        tiny_base("vit_base_patch16_224", weights=path)


def test_weight_file_errors(tmp_path):
    with pytest.raises(zoo.WeightsFileError, match="does not exist"):
        tiny_base("resnet18", weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(zoo.WeightsFileError, match="cannot read"):
        tiny_base("resnet18", weights=bad)
    odd = tmp_path / "w.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(zoo.WeightsFileError, match="unknown weight file format"):
        tiny_base("resnet18", weights=odd)
    npz = tmp_path / "w.npz"
    npz.write_bytes(b"x")
    with pytest.raises(zoo.WeightsFileError, match="need a timm preset"):
        tiny_base("resnet18", weights=npz)
    empty = tmp_path / "opt.pth"
    torch.save({"optimizer": 1}, empty)
    with pytest.raises(zoo.WeightsFileError, match="holds no state dict"):
        tiny_base("resnet18", weights=empty)
    with pytest.raises(rlrr.ConfigError, match="loader"):
        tiny_base("resnet18", weights=empty, loader="hub")


def test_random_weights_warning_names_the_source():
    with torch.device("meta"), pytest.warns(zoo.RandomWeightsWarning, match=r"ResNet50_Weights\.IMAGENET1K_V1"):
        zoo.build_base("resnet50")


def test_unknown_preset_lists_presets_and_close_matches():
    with pytest.raises(zoo.UnknownPresetError) as e:
        zoo.build("vit_base_patch16", num_classes=10)
    msg = str(e.value)
    assert isinstance(e.value, rlrr.RLRRError) and isinstance(e.value, LookupError)
    assert "Did you mean 'vit_base_patch16_224'" in msg
    assert all(n in msg for n in PRESETS)
    with pytest.raises(zoo.UnknownPresetError, match="Presets: "):
        zoo.get_preset("efficientnet_b0")


# --- adapter files ----------------------------------------------------------------------------------


@torch.no_grad()
def _randomise_trainable(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # shifts start at zero: move everything


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "swin_base_patch4_window7_224", "vit_b_16", "convnext_atto"])
def test_from_adapter_round_trip(tmp_path, name):
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in perturb_(tiny_base(name)).state_dict().items()}, str(weights))
    model = tiny(name, weights=weights).eval()
    _randomise_trainable(model)
    x = sample(model)
    with torch.no_grad():  # the same code path as below (nn.MultiheadAttention has a no-grad fast path)
        expected = model(x)
    meta = zoo.adapter_metadata(model)
    assert {"preset", "model", "num_classes", "img_size"} <= meta.keys() and meta["weights"] == "base.safetensors"
    path = rlrr.save_adapter(model, tmp_path / "adapter.safetensors", metadata=meta)
    rebuilt = zoo.from_adapter(path, weights=weights).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)
    record = zoo.build_record(rebuilt)
    assert (record.preset, record.num_classes, record.rank) == (name, NUM_CLASSES, 1)
    assert {n for n, p in rebuilt.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.warns(zoo.RandomWeightsWarning, match="base.safetensors"):
        zoo.from_adapter(path)


def test_adapter_metadata_from_a_preset_name_and_errors(tmp_path):
    meta = zoo.adapter_metadata("vit_b_16", num_classes=10, tiny=True)
    assert (meta["preset"], meta["model"], meta["num_classes"], meta["img_size"]) == ("vit_b_16", "VisionTransformer", 10, 32)
    with pytest.raises(zoo.AdapterMetadataError, match="not built by zoo.build"):
        zoo.adapter_metadata(nn.Linear(2, 2))
    plain = rlrr.apply(tiny_base("resnet18"), "conv", trainable="fc")
    path = rlrr.save_adapter(plain, tmp_path / "plain.safetensors")
    with pytest.raises(zoo.AdapterMetadataError, match="no zoo metadata"):
        zoo.from_adapter(path)


def test_rank_and_kwargs_survive_the_round_trip(tmp_path):
    model = zoo.build("resnet18", num_classes=3, rank=2, tiny=True)
    path = rlrr.save_adapter(model, tmp_path / "r2.safetensors", metadata=zoo.adapter_metadata(model))
    rebuilt = zoo.from_adapter(path)
    assert zoo.build_record(rebuilt).rank == 2 and rlrr.adapters_of(rebuilt)[0].config.rank == 2
    assert rebuilt.fc.out_features == 3
