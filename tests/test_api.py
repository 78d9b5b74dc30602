"""API and error-path tests for rlrr: targets, site discovery, apply/plan, fold, save/load, errors.

Models are small hand-written modules (plus timm's tiny `test_vit` once). Base weights are
perturbed so that default inits (LayerNorm ones/zeros, zero biases) hide nothing, and adapters are
randomised before a fold is checked, since an untrained adapter could fold trivially. Fold checks
run in float64, where unmerged forward and folded forward agree to about 1e-12.

Every error test checks the error class, that the message names something useful (the site, the
option, what exists), and that the model is left exactly as it was (`assert_unchanged`).
"""

from __future__ import annotations

import copy
import operator
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

import rlrr
from export import fold, fold_with_report

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


# ----------------------------------------------------------------------------- models


class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(a @ v)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attn(d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Net(nn.Module):
    """A conv stem, two transformer blocks, a final norm and a head: 15 sites."""

    def __init__(self, d: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, d, 2, stride=2)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(1))


NET_SITES = ["stem"] + [
    f"blocks.{i}.{n}" for i in range(2) for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "fc1", "fc2")
] + ["norm", "head"]


def net_input(dtype=torch.float32):
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(dtype)


class FunctionalLayers(nn.Module):
    """Layers written with torch.nn.functional over raw parameters, one with a computed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(6))
        self.g = nn.Parameter(torch.randn(6))
        self.beta = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(6, 6))
        self.k = nn.Parameter(torch.randn(5, 3, 3, 2))
        self.kb = nn.Parameter(torch.randn(5))

    def forward(self, x, img):
        y = F.linear(x, self.w, self.b)
        y = F.layer_norm(y, (6,), self.g, self.beta)
        y = F.linear(y, self.w2 * 2)  # computed weight: not adaptable
        z = F.conv2d(img, self.k, self.kb, padding=1)
        return y, z


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = FunctionalLayers()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x, img, q):
        y, z = self.f(x, img)
        return y, z, self.mha(q, q, q)[0]


def functional_inputs(dtype=F64):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(3, 4, generator=g).to(dtype), torch.randn(2, 3, 5, 5, generator=g).to(dtype),
            torch.randn(2, 3, 8, generator=g).to(dtype))


class BiasFree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, (3, 2), bias=False)
        self.lin = nn.Linear(4, 6, bias=False)
        self.ln = nn.LayerNorm(6, elementwise_affine=False)
        self.ln_nobias = nn.LayerNorm(6, bias=False)

    def forward(self, img):
        x = self.conv(img).mean((2, 3))
        return self.ln_nobias(self.ln(self.lin(x)))


class Tied(nn.Module):
    """Two Linear layers sharing one weight Parameter, and a module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.twice = nn.Linear(4, 4)

    def forward(self, x):
        return self.twice(self.twice(self.b(torch.tanh(self.a(x)))))


class Untraceable(nn.Module):
    """Data-dependent control flow in forward, plain torch.nn layers inside."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.ln = nn.LayerNorm(4)

    def forward(self, x, img):
        if x.sum() > 0:
            x = self.lin(x)
        return self.ln(x), self.conv(img)


class UntraceableNoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(4))

    def forward(self, x):
        if x.sum() > 0:
            return x * self.p
        return x


class Small(nn.Module):
    """A big enough linear next to a tiny one (4 -> 3): rank 5 fits `big` only."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(8, 8)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(self.big(x)[:, :4])


class Other(nn.Module):
    """Same module names as Net, other widths: an adapter file for Net does not fit."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.blocks = nn.ModuleList([Block(6), Block(6)])
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    forward = Net.forward


# ----------------------------------------------------------------------------- helpers


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random base weights everywhere (LayerNorm γ = 1, β = 0 would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def randomise_adapters(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rlrr_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))


def adapter_numel(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "rlrr_" in n)


def site_names(model: nn.Module) -> list[str]:
    return [a.site.name for a in rlrr.adapters_of(model)]


def parametrized_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "parametrized": parametrized_modules(model),
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "adapters": len(rlrr.adapters_of(model)),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, equal_nan=True, msg=f"{k} changed")
    assert after["grad"] == before["grad"]
    assert after["parametrized"] == before["parametrized"]
    assert after["types"] == before["types"]
    assert after["adapters"] == before["adapters"]


def run(model: nn.Module, inputs):
    model.eval()
    with torch.no_grad():
        return model(*inputs)


def assert_folds_exactly(model: nn.Module, inputs, **tol):
    """Fold, and check the plain model computes what the adapted one did."""
    before = run(model, inputs)
    _, report = fold_with_report(model)
    assert rlrr.adapters_of(model) == []
    assert parametrized_modules(model) == []
    assert not any("rlrr_" in n for n in model.state_dict())
    torch.testing.assert_close(run(model, inputs), before, **(tol or TOL))
    return report


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture
def net():
    torch.manual_seed(0)
    return perturbed(Net())


# ----------------------------------------------------------------------------- 1. targets


def test_targets_none_selects_every_site_in_execution_order(net):
    assert [s.name for s in rlrr.plan(net).sites] == NET_SITES
    rlrr.apply(net)
    assert site_names(net) == NET_SITES


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("linear", [n for n in NET_SITES if n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2", "head")]),
        ("conv", ["stem"]),
        ("norm", [n for n in NET_SITES if "norm" in n]),
    ],
)
def test_targets_by_kind(net, kind, expected):
    the_plan = rlrr.plan(net, kind)
    assert [s.name for s in the_plan.sites] == expected
    assert {s.kind for s in the_plan.sites} == {kind}
    rlrr.apply(net, kind)
    assert site_names(net) == expected


@pytest.mark.parametrize(
    "target, expected",
    [
        ("*.fc1", ["blocks.0.fc1", "blocks.1.fc1"]),
        ("blocks.*.attn.qkv", ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]),
        ("blocks.1.norm?", ["blocks.1.norm1", "blocks.1.norm2"]),
        ("head", ["head"]),
        ("re:blocks\\.\\d\\.fc[12]", ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]),
        ("re:.*norm", ["norm"]),  # full match: "blocks.0.norm1" does not match
        (re.compile(r"blocks\.0\.attn\..*"), ["blocks.0.attn.qkv", "blocks.0.attn.proj"]),
    ],
    ids=["glob-suffix", "glob-qkv", "glob-?", "exact", "re-string", "re-fullmatch", "re-compiled"],
)
def test_targets_globs_and_regexes(net, target, expected):
    assert [s.name for s in rlrr.plan(net, target).sites] == expected
    rlrr.apply(net, target)
    assert site_names(net) == expected


def test_regex_is_a_full_match_not_a_search(net):
    before = snapshot(net)
    with pytest.raises(rlrr.NoMatchingTargetsError, match="fc1"):
        rlrr.apply(net, "re:fc1")
    assert_unchanged(net, before)


def test_targets_predicate_gets_owner_module_and_site_name(net):
    calls = []

    def wanted(module, name):
        calls.append((type(module).__name__, name))
        return isinstance(module, nn.Linear) and module.out_features == 8

    the_plan = rlrr.plan(net, wanted)
    assert sorted(calls) == sorted((type(net.get_submodule(n)).__name__, n) for n in NET_SITES)
    expected = ["blocks.0.attn.proj", "blocks.0.fc2", "blocks.1.attn.proj", "blocks.1.fc2"]
    assert [s.name for s in the_plan.sites] == expected
    rlrr.apply(net, wanted)
    assert site_names(net) == expected


def test_targets_list_is_a_union_in_discovery_order(net):
    targets = ["conv", "*.fc1", "re:blocks\\.1\\.attn\\..*", re.compile("head"), lambda m, n: n == "norm", "*.fc1"]
    expected = ["stem", "blocks.0.fc1", "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.fc1", "norm", "head"]
    assert [s.name for s in rlrr.plan(net, targets).sites] == expected
    rlrr.apply(net, tuple(targets))
    assert site_names(net) == expected
    # everything else is frozen and untouched
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("rlrr_" in n for n in trainable)


def test_targets_list_item_matching_nothing_warns_and_adapts_the_rest(net):
    with pytest.warns(UserWarning, match=re.escape("'nothing*'")):
        rlrr.apply(net, ["*.fc2", "nothing*"])
    assert site_names(net) == ["blocks.0.fc2", "blocks.1.fc2"]


def test_plan_reports_unselected_sites_as_skipped(net):
    the_plan = rlrr.plan(net, "head")
    reasons = {k.name: k.reason for k in the_plan.skipped}
    assert all(reasons.get(n) == "not in targets" for n in NET_SITES if n != "head")


def test_multihead_attention_site_names_and_fold():
    torch.manual_seed(0)
    model = perturbed(FunctionalNet()).double()
    the_plan = rlrr.plan(model, "mha.*")
    assert [s.name for s in the_plan.sites] == ["mha.in_proj", "mha.out_proj"]
    in_proj = the_plan.sites[0]
    assert (in_proj.weight, in_proj.bias, in_proj.chunks, in_proj.shape) == ("in_proj_weight", "in_proj_bias", 3, (24, 8))
    rlrr.apply(model, "mha.in_proj")
    assert site_names(model) == ["mha.in_proj"]
    assert parametrized_modules(model) == ["mha"]
    randomise_adapters(model)
    assert_folds_exactly(model, functional_inputs())


# ----------------------------------------------------------------------------- 2. functional sites


def test_functional_sites_are_found_adapted_and_fold_exactly():
    torch.manual_seed(0)
    model = FunctionalNet().double()
    base = copy.deepcopy(model)
    the_plan = rlrr.plan(model, "f.*")
    sites = {s.name: s for s in the_plan.sites}
    assert list(sites) == ["f.w", "f.g", "f.k"]
    assert (sites["f.w"].kind, sites["f.w"].op, sites["f.w"].bias, sites["f.w"].bias_state) == ("linear", "F.linear", "b", "present")
    assert (sites["f.g"].kind, sites["f.g"].op, sites["f.g"].bias) == ("norm", "F.layer_norm", "beta")
    assert (sites["f.k"].kind, sites["f.k"].op, sites["f.k"].bias, sites["f.k"].shape) == ("conv", "F.conv2d", "kb", (5, 3, 3, 2))

    rlrr.apply(model, "f.*")
    assert site_names(model) == ["f.w", "f.g", "f.k"]
    assert not parametrize.is_parametrized(model.f, "w2")
    randomise_adapters(model)
    inputs = functional_inputs()
    adapted = run(model, inputs)
    assert not torch.allclose(adapted[0], run(base, inputs)[0])  # the adapters really act
    assert_folds_exactly(model, inputs)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in base.named_parameters()}


def test_functional_op_with_computed_weight_is_skipped_with_a_reason():
    model = FunctionalNet()
    the_plan = rlrr.plan(model)
    computed = [k for k in the_plan.skipped if k.op == "F.linear"]
    assert len(computed) == 1
    assert "computed" in computed[0].reason
    assert "w2" not in {s.weight for s in the_plan.sites}
    assert computed[0].name in the_plan.table() and "computed" in the_plan.table()
    rlrr.apply(model)
    assert "f.w2" in dict(model.named_parameters()) and not model.f.w2.requires_grad


def test_skipped_functional_op_says_where_it_is():
    skipped = [k for k in rlrr.plan(FunctionalNet()).skipped if k.op == "F.linear"]
    assert skipped[0].name.startswith("f.")


# ----------------------------------------------------------------------------- 3. bias handling


def test_bias_free_linear_gets_a_shift_that_becomes_its_bias():
    torch.manual_seed(0)
    model = perturbed(BiasFree()).double()
    site = {s.name: s for s in rlrr.plan(model).sites}["lin"]
    assert site.bias_state == "creatable"
    rlrr.apply(model, "lin")
    (adapter,) = rlrr.adapters_of(model)
    assert adapter.rlrr_shift is not None and adapter.rlrr_shift.shape == (6,)
    assert "lin.bias" not in dict(model.named_parameters())  # a frozen buffer until the fold
    assert torch.equal(model.lin.bias, torch.zeros(6, dtype=F64))
    randomise_adapters(model)
    shift = adapter.rlrr_shift.detach().clone()
    report = assert_folds_exactly(model, (torch.randn(2, 3, 5, 5, dtype=F64),))
    assert report.created == ["lin.bias"]
    assert isinstance(model.lin.bias, nn.Parameter) and not model.lin.bias.requires_grad
    assert torch.equal(model.lin.bias.detach(), shift)
    assert "lin.bias" in model.state_dict()


def test_bias_free_conv_gets_no_shift():
    torch.manual_seed(0)
    model = perturbed(BiasFree()).double()
    rlrr.apply(model, "conv")
    (adapter,) = rlrr.adapters_of(model)
    assert adapter.rlrr_shift is None and not adapter.adapts_bias
    assert model.conv.bias is None
    O, I, kh, kw = model.conv.weight.shape
    assert adapter_numel(model) == 1 * (O * kh + I * kw)
    randomise_adapters(model)
    report = assert_folds_exactly(model, (torch.randn(2, 3, 5, 5, dtype=F64),))
    assert report.created == [] and model.conv.bias is None
    assert "conv.bias" not in model.state_dict()


def test_layernorm_without_affine_is_adapted_and_folds_exactly():
    torch.manual_seed(0)
    model = perturbed(BiasFree()).double()
    site = {s.name: s for s in rlrr.plan(model).sites}["ln"]
    assert site.weight_missing and site.kind == "norm"
    rlrr.apply(model, "ln")
    assert adapter_numel(model) == 2 * 6
    randomise_adapters(model)
    report = assert_folds_exactly(model, (torch.randn(2, 3, 5, 5, dtype=F64),))
    assert sorted(report.created) == ["ln.bias", "ln.weight"]
    assert isinstance(model.ln.weight, nn.Parameter) and isinstance(model.ln.bias, nn.Parameter)
    assert model.ln.elementwise_affine


def test_layernorm_without_bias_is_adapted_and_folds_exactly():
    torch.manual_seed(0)
    model = perturbed(BiasFree()).double()
    rlrr.apply(model, "ln_nobias")
    assert site_names(model) == ["ln_nobias"]
    randomise_adapters(model)
    report = assert_folds_exactly(model, (torch.randn(2, 3, 5, 5, dtype=F64),))
    assert report.created == ["ln_nobias.bias"]
    assert isinstance(model.ln_nobias.bias, nn.Parameter)


def test_all_bias_free_layers_together_fold_exactly():
    torch.manual_seed(0)
    model = perturbed(BiasFree()).double()
    rlrr.apply(model, rank=2)
    randomise_adapters(model)
    report = assert_folds_exactly(model, (torch.randn(2, 3, 5, 5, dtype=F64),))
    assert sorted(report.created) == ["lin.bias", "ln.bias", "ln.weight", "ln_nobias.bias"]


# ----------------------------------------------------------------------------- 4. weight tying


def test_tied_weights_and_a_module_called_twice_get_one_adapter_each():
    torch.manual_seed(0)
    model = perturbed(Tied()).double()
    assert model.a.weight is model.b.weight
    the_plan = rlrr.plan(model)
    assert [s.name for s in the_plan.sites] == ["a", "twice"]
    rlrr.apply(model)
    assert len(rlrr.adapters_of(model)) == 2
    # both holders of the tied weight read the same adapted tensor
    assert model.a.parametrizations.weight[0] is model.b.parametrizations.weight[0]
    assert model.a.parametrizations.weight.original is model.b.parametrizations.weight.original
    assert adapter_numel(model) == the_plan.adapter_parameters == 2 * (4 + 4 + 4)
    randomise_adapters(model)
    torch.testing.assert_close(model.a.weight, model.b.weight, rtol=0, atol=0)
    x = torch.randn(3, 4, dtype=F64)
    assert_folds_exactly(model, (x,))
    assert model.a.weight is model.b.weight  # still tied after the fold


# ----------------------------------------------------------------------------- 5. untraceable models


def test_the_tracer_unpacks_proxies_as_fx_does():
    """`a, b, c = y.chunk(3)` and `q, k = y.unbind(0)` give fx's own graph (the tracer caches the bytecode it reads)."""
    from torch import fx

    from rlrr.trace import make_tracer

    class Unpacks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 12)

        def forward(self, x):
            a, b, c = self.proj(x).chunk(3, -1)
            q, k = self.proj(x).reshape(2, -1, 6).unbind(0)
            return a + b * c + q.sum() + k.sum()

    ours, theirs = make_tracer().trace(Unpacks()), fx.Tracer().trace(Unpacks())
    assert [(n.op, str(n.target), str(n.args)) for n in ours.nodes] == [(n.op, str(n.target), str(n.args)) for n in theirs.nodes]
    assert sum(n.target is operator.getitem for n in ours.nodes) == 5


def test_untraceable_model_falls_back_to_layers_found_by_type():
    torch.manual_seed(0)
    model = perturbed(Untraceable()).double()
    the_plan = rlrr.plan(model)
    assert [(s.name, s.found_by) for s in the_plan.sites] == [("lin", "type"), ("conv", "type"), ("ln", "type")]
    assert the_plan.not_analysed and the_plan.not_analysed[0][0] == ""
    assert "not analysed" in the_plan.table()
    with pytest.warns(UserWarning, match="could not trace"):
        rlrr.apply(model)
    assert site_names(model) == ["lin", "conv", "ln"]
    randomise_adapters(model)
    inputs = (torch.rand(3, 4, dtype=F64) + 0.1, torch.randn(2, 2, 5, 5, dtype=F64))
    assert_folds_exactly(model, inputs)


def test_untraceable_model_with_traceable_child_traces_the_child():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
            self.extra = nn.Linear(4, 4)

        def forward(self, x):
            return self.extra(x) if x.sum() > 0 else self.body(x)

    the_plan = rlrr.plan(Wrapper())
    assert [(s.name, s.found_by) for s in the_plan.sites] == [("body.0", "trace"), ("body.2", "trace"), ("extra", "type")]


@pytest.mark.parametrize("model_cls, why", [(UntraceableNoLayers, "control flow"), (nn.Identity, "no linear, conv or LayerNorm")])
def test_model_with_nothing_to_adapt_raises_trace_error(model_cls, why):
    model = model_cls()
    before = snapshot(model)
    for call in (rlrr.plan, rlrr.apply):
        with pytest.raises(rlrr.TraceError, match=why) as info:
            call(model)
        assert model_cls.__name__ in str(info.value)
        assert isinstance(info.value, RuntimeError)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- 6. errors


def test_targets_matching_nothing_lists_what_exists(net):
    before = snapshot(net)
    with pytest.raises(rlrr.NoMatchingTargetsError) as info:
        rlrr.apply(net, "*.mlp.fc1")
    msg = str(info.value)
    assert "'*.mlp.fc1'" in msg and "15 sites" in msg and "stem" in msg and "blocks.0.attn.qkv" in msg
    assert isinstance(info.value, ValueError)
    assert_unchanged(net, before)


@pytest.mark.parametrize("targets", [[], (), ["nope*", re.compile("nothing")]])
def test_empty_or_all_missing_target_lists_raise(net, targets):
    before = snapshot(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(rlrr.NoMatchingTargetsError, match="no|empty"):
            rlrr.apply(net, targets)
    assert_unchanged(net, before)


@pytest.mark.parametrize("targets", ["lienar", ["*.fc1", "nrom"], "conv2d"])
def test_unknown_target_kind_suggests_the_right_one(net, targets):
    before = snapshot(net)
    with pytest.raises(rlrr.UnknownTargetKindError) as info:
        rlrr.apply(net, targets)
    msg = str(info.value)
    typo = targets if isinstance(targets, str) else targets[1]
    suggestion = {"lienar": "'linear'", "nrom": "'norm'", "conv2d": "'conv'"}[typo]
    assert repr(typo) in msg and suggestion in msg
    assert isinstance(info.value, rlrr.ConfigError) and isinstance(info.value, ValueError)
    assert_unchanged(net, before)


@pytest.mark.parametrize("target", [
    42,
    [None], [3.5],
])
def test_target_of_a_wrong_type_is_rejected(net, target):
    before = snapshot(net)
    with pytest.raises(rlrr.UnknownTargetKindError, match="target must be"):
        rlrr.apply(net, target)
    assert_unchanged(net, before)


def test_invalid_regex_target_is_a_config_error(net):
    with pytest.raises(rlrr.ConfigError, match=re.escape("re:blocks[")):
        rlrr.plan(net, "re:blocks[")


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "2"])
def test_invalid_rank_values(net, rank):
    before = snapshot(net)
    for call in (rlrr.plan, rlrr.apply):
        with pytest.raises(rlrr.InvalidRankError) as info:
            call(net, rank=rank)
        assert repr(rank) in str(info.value) and "rank" in str(info.value)
        assert isinstance(info.value, rlrr.ConfigError) and isinstance(info.value, ValueError)
    assert_unchanged(net, before)


def test_rank_larger_than_a_layer_allows_names_the_site():
    model = Small()
    before = snapshot(model)
    with pytest.raises(rlrr.InvalidRankError) as info:
        rlrr.apply(model, rank=5)
    msg = str(info.value)
    assert "lin" in msg and "(3, 4)" in msg and "at most 3" in msg and "big" not in msg
    assert_unchanged(model, before)
    # excluding the small layer makes rank 5 fine
    rlrr.apply(model, "big", rank=5)
    assert site_names(model) == ["big"]


def test_rank_limit_counts_fused_chunks(net):
    # qkv (24, 8) in 3 chunks allows min(24 / 3, 8) = 8, so does fc1 (16, 8); head (5, 8) allows 5
    rlrr.plan(net, ["*.qkv", "*.proj", "*.fc?"], rank=8)
    with pytest.raises(rlrr.InvalidRankError, match=re.escape("head (shape (5, 8), at most 5)")):
        rlrr.plan(net, "linear", rank=8)
    with pytest.raises(rlrr.InvalidRankError, match="blocks.0.attn.qkv"):
        rlrr.plan(net, "*.qkv", rank=9)


def test_apply_twice_raises_and_leaves_the_first_adaptation(net):
    rlrr.apply(net, "linear")
    before = snapshot(net)
    for call in (rlrr.apply, rlrr.plan):
        with pytest.raises(rlrr.AlreadyAdaptedError, match="already") as info:
            call(net, "norm")
        assert "Net" in str(info.value)
    assert_unchanged(net, before)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"scaling": "up"}, ["'up'", "both"]),
        ({"scaling": "LEFT"}, ["'LEFT'", "left"]),
        ({"init": "zeros"}, ["'zeros'", "identity"]),
        ({"lowrank": True, "residual": False}, ["lowrank", "residual"]),
        ({"lowrank": True, "scaling": "left"}, ["lowrank", "scaling"]),
    ],
)
def test_bad_options_raise_config_error(net, options, words):
    before = snapshot(net)
    with pytest.raises(rlrr.ConfigError) as info:
        rlrr.apply(net, **options)
    assert all(w in str(info.value) for w in words)
    assert isinstance(info.value, ValueError)
    assert_unchanged(net, before)


def test_one_sided_scaling_needs_rank_one(net):
    with pytest.raises(rlrr.InvalidRankError, match="rank must be 1"):
        rlrr.apply(net, scaling="left", rank=2)


def test_unknown_trainable_module_lists_top_level_modules(net):
    before = snapshot(net)
    with pytest.raises(rlrr.ConfigError) as info:
        rlrr.apply(net, trainable="classifier")
    msg = str(info.value)
    assert "'classifier'" in msg and "head" in msg and "blocks" in msg
    assert_unchanged(net, before)


def test_fold_without_adapters_raises(net):
    before = snapshot(net)
    with pytest.raises(rlrr.NotAdaptedError, match="Net"):
        fold(net)
    assert_unchanged(net, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["rlrr_s_left", "rlrr_shift"])
def test_fold_with_non_finite_adapter_raises_and_changes_nothing(net, bad, where):
    net = net.double()
    rlrr.apply(net, trainable="head")
    randomise_adapters(net)
    victim = rlrr.adapters_of(net)[5]  # blocks.0.fc1
    assert victim.site.name == "blocks.0.fc1"
    with torch.no_grad():
        getattr(victim, where).view(-1)[1] = bad
    x = net_input(F64)
    out_before = run(net, (x,))
    before = snapshot(net)
    with pytest.raises(rlrr.NonFiniteError) as info:
        fold(net)
    assert "blocks.0.fc1" in str(info.value) and "not changed" in str(info.value)
    assert isinstance(info.value, FloatingPointError)
    assert_unchanged(net, before)
    torch.testing.assert_close(run(net, (x,)), out_before, rtol=0, atol=0, equal_nan=True)
    # repaired, the same model folds
    with torch.no_grad():
        getattr(victim, where).view(-1)[1] = 0.5
    assert_folds_exactly(net, (x,))


def test_failure_half_way_through_apply_is_undone(monkeypatch):
    import rlrr.inject

    torch.manual_seed(0)
    model = perturbed(BiasFree())
    model.conv.weight.requires_grad_(False)  # a user's own freezing is restored too
    before = snapshot(model)
    real = rlrr.inject.build_adapter
    calls = []

    def failing(site, weight, config):
        calls.append(site.name)
        if site.name == "ln_nobias":  # the last site: bias buffers were already created on lin and ln
            raise RuntimeError("boom")
        return real(site, weight, config)

    monkeypatch.setattr(rlrr.inject, "build_adapter", failing)
    with pytest.raises(rlrr.RLRRError, match="undone.*boom"):
        rlrr.apply(model)
    assert calls == ["conv", "lin", "ln", "ln_nobias"]
    assert_unchanged(model, before)
    assert model.lin.bias is None and model.ln.weight is None and model.ln.bias is None
    assert not model.ln.elementwise_affine


def test_weight_with_a_user_parametrization_is_refused_or_folded():
    torch.manual_seed(0)
    model = perturbed(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))).double()
    torch.nn.utils.parametrizations.weight_norm(model[2])
    before = snapshot(model)
    try:
        rlrr.apply(model)
    except rlrr.RLRRError as e:  # refusing is fine, if it says where and changes nothing
        assert "2" in str(e)
        assert_unchanged(model, before)
        return
    randomise_adapters(model)
    adapted = snapshot(model)
    x = torch.randn(3, 4, dtype=F64)
    try:
        out = run(model, (x,))
        fold(model)
    except rlrr.RLRRError as e:  # refusing to fold is fine too, before anything is written
        assert "this is a bug" not in str(e)
        assert_unchanged(model, adapted)
        return
    assert rlrr.adapters_of(model) == []
    torch.testing.assert_close(run(model, (x,)), out, **TOL)


def test_adapted_model_survives_deepcopy_and_state_dict_round_trip(net):
    base = copy.deepcopy(net)
    rlrr.apply(net, rank=2)
    randomise_adapters(net)
    x = net_input()
    twin = copy.deepcopy(net)
    assert torch.equal(run(twin, (x,)), run(net, (x,)))
    head = rlrr.adapters_of(twin)[-1]
    assert twin.head.parametrizations.bias[0].adapter is head  # the bias view follows the copy
    with torch.no_grad():
        head.rlrr_shift.add_(1.0)
    assert not torch.equal(run(twin, (x,)), run(net, (x,)))
    other = copy.deepcopy(base)
    rlrr.apply(other, rank=2)
    other.load_state_dict(net.state_dict())
    assert torch.equal(run(other, (x,)), run(net, (x,)))


def test_error_classes_form_a_hierarchy():
    for cls in (rlrr.ConfigError, rlrr.UnknownTargetKindError, rlrr.InvalidRankError, rlrr.TraceError, rlrr.NoMatchingTargetsError,
                rlrr.AlreadyAdaptedError, rlrr.NotAdaptedError, rlrr.AdapterFileError, rlrr.AdapterMismatchError, rlrr.NonFiniteError):
        assert issubclass(cls, rlrr.RLRRError)
    assert issubclass(rlrr.AdapterFileError, OSError)
    assert issubclass(rlrr.UnknownTargetKindError, rlrr.ConfigError)


# ----------------------------------------------------------------------------- 7. save / load


SAVE_CONFIGS = [
    {"rank": 2},
    {"scaling": "left"},
    {"scaling": "right", "residual": False},
    {"lowrank": True, "rank": 3},
    {"fused_chunks": False, "shift": False},
]


def adapted_net(seed=0, **options):
    torch.manual_seed(seed)
    base = perturbed(Net(), seed)
    model = copy.deepcopy(base)
    rlrr.apply(model, trainable="head", **options)
    randomise_adapters(model, seed + 1)
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.head.bias.sub_(0.5)
    return base, model


def grad_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("options", SAVE_CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_save_then_load_into_a_fresh_model_reproduces_it(tmp_path, options):
    base, model = adapted_net(**options)
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors", metadata={"epoch": 3})
    assert os.listdir(tmp_path) == ["a.safetensors"]  # atomic: no temp file left
    assert rlrr.read_adapter_file(path).metadata == {"epoch": 3}

    fresh = copy.deepcopy(base)
    assert rlrr.load_adapter(fresh, path, trainable="head") is fresh
    assert site_names(fresh) == site_names(model) == NET_SITES[:-1]
    config = rlrr.adapters_of(fresh)[0].config
    assert config == rlrr.adapters_of(model)[0].config
    assert all(getattr(config, k) == v for k, v in options.items())
    assert grad_names(fresh) == grad_names(model)
    assert grad_names(fresh) == {n for n, _ in fresh.named_parameters() if "rlrr_" in n} | {"head.weight", "head.bias"}
    x = net_input()
    torch.testing.assert_close(run(fresh, (x,)), run(model, (x,)), rtol=0, atol=0)
    assert fresh.head.weight.equal(model.head.weight)
    # a loaded model folds like the original
    torch.testing.assert_close(run(fold(fresh), (x,)), run(model, (x,)), rtol=1e-5, atol=1e-6)


def test_load_into_an_already_adapted_model_with_the_same_sites(tmp_path):
    base, model = adapted_net(rank=2)
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    other = copy.deepcopy(base)
    rlrr.apply(other, trainable="head", rank=2)
    rlrr.load_adapter(other, path)
    assert len(rlrr.adapters_of(other)) == len(NET_SITES) - 1
    x = net_input()
    torch.testing.assert_close(run(other, (x,)), run(model, (x,)), rtol=0, atol=0)
    assert grad_names(other) == grad_names(model)


@pytest.mark.parametrize("saved, present", [({"rank": 2}, {"rank": 1}), ({"scaling": "left"}, {})], ids=["rank", "scaling"])
def test_load_into_an_adapted_model_with_another_config_is_a_mismatch(tmp_path, saved, present):
    base, model = adapted_net(**saved)
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    other = copy.deepcopy(base)
    rlrr.apply(other, trainable="head", **present)
    before = snapshot(other)
    with pytest.raises(rlrr.AdapterMismatchError):
        rlrr.load_adapter(other, path)
    assert_unchanged(other, before)


def test_load_into_an_adapted_model_with_other_sites_is_a_mismatch(tmp_path):
    base, model = adapted_net()
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    other = copy.deepcopy(base)
    rlrr.apply(other, "linear", trainable="head")
    before = snapshot(other)
    with pytest.raises(rlrr.AdapterMismatchError) as info:
        rlrr.load_adapter(other, path)
    msg = str(info.value)
    assert "stem: not in this model" in msg and "blocks.0.norm1: not in this model" in msg and "Net" in msg
    assert_unchanged(other, before)


def test_load_file_of_another_architecture_names_the_mismatched_sites(tmp_path):
    _, model = adapted_net()
    path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    for target in (perturbed(Other()), nn.Sequential(nn.Linear(8, 8))):
        before = snapshot(target)
        with pytest.raises(rlrr.AdapterMismatchError) as info:
            rlrr.load_adapter(target, path)
        msg = str(info.value)
        assert "a.safetensors" in msg and type(target).__name__ in msg
        if isinstance(target, Other):
            assert "stem: file has conv (8, 3, 2, 2), model has conv (6, 3, 2, 2)" in msg
            assert "blocks.0.attn.qkv" in msg
        else:
            assert "stem: not in this model" in msg
        assert isinstance(info.value, ValueError)
        assert_unchanged(target, before)


def write_bad_files(tmp_path, good):
    data = good.read_bytes()
    files = {}
    files["truncated"] = tmp_path / "truncated.safetensors"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"] = tmp_path / "random.safetensors"
    files["random"].write_bytes(os.urandom(512))
    files["empty"] = tmp_path / "empty.safetensors"
    files["empty"].write_bytes(b"")
    files["plain"] = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, str(files["plain"]))
    files["damaged-meta"] = tmp_path / "damaged.safetensors"
    save_file({"weight": torch.zeros(3)}, str(files["damaged-meta"]), metadata={"format": "rlrr.adapter/1", "config": "{not json"})
    files["missing"] = tmp_path / "missing.safetensors"
    files["folder"] = tmp_path
    return files


@pytest.mark.parametrize("kind, words", [
    ("truncated", ["truncated"]), ("random", ["truncated"]), ("empty", ["safetensors"]),
    ("plain", ["not an rlrr adapter"]), ("damaged-meta", ["damaged"]), ("missing", ["does not exist"]), ("folder", ["does not exist"]),
])
def test_unreadable_adapter_files_raise_adapter_file_error(tmp_path, kind, words):
    _, model = adapted_net()
    good = rlrr.save_adapter(model, tmp_path / "good.safetensors")
    bad = write_bad_files(tmp_path, good)[kind]
    fresh = perturbed(Net())
    before = snapshot(fresh)
    with pytest.raises(rlrr.AdapterFileError) as info:
        rlrr.load_adapter(fresh, bad)
    assert str(bad) in str(info.value)
    assert all(w in str(info.value) for w in words)
    assert isinstance(info.value, OSError)
    assert_unchanged(fresh, before)


def test_save_into_a_missing_folder_leaves_no_file(tmp_path):
    _, model = adapted_net()
    target = tmp_path / "nowhere" / "a.safetensors"
    with pytest.raises(rlrr.AdapterFileError, match="nowhere"):
        rlrr.save_adapter(model, target)
    assert not target.exists() and os.listdir(tmp_path) == []


def test_save_overwrites_atomically(tmp_path):
    _, first = adapted_net(seed=0)
    _, second = adapted_net(seed=5, rank=2)
    path = tmp_path / "a.safetensors"
    rlrr.save_adapter(first, path)
    rlrr.save_adapter(second, str(path))
    assert os.listdir(tmp_path) == ["a.safetensors"]
    assert rlrr.read_adapter_file(path).config.rank == 2


def test_saved_file_gets_the_mode_the_umask_gives(tmp_path):
    _, model = adapted_net()
    old = os.umask(0o027)
    try:
        path = rlrr.save_adapter(model, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640  # not safetensors' own 0600


def test_save_without_adapters_raises(net, tmp_path):
    with pytest.raises(rlrr.NotAdaptedError, match="apply"):
        rlrr.save_adapter(net, tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


def test_saved_file_holds_only_adapters_and_head(tmp_path):
    _, model = adapted_net()
    stored = rlrr.read_adapter_file(rlrr.save_adapter(model, tmp_path / "a.safetensors"))
    assert [s.name for s in stored.sites] == NET_SITES[:-1]
    assert stored.config == rlrr.RLRRConfig()
    assert set(stored.trained) == {"head.weight", "head.bias"}
    assert sum(v.numel() for v in stored.tensors.values()) == adapter_numel(model)


def test_save_onto_a_folder_fails_cleanly(tmp_path):
    _, model = adapted_net()
    (tmp_path / "a.safetensors").mkdir()
    with pytest.raises(rlrr.AdapterFileError, match="a.safetensors"):
        rlrr.save_adapter(model, tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == ["a.safetensors"] and (tmp_path / "a.safetensors").is_dir()


def resave(path, out, tensors=None, **meta_changes):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    data = load_file(str(path)) if tensors is None else tensors
    save_file(data, str(out), metadata={**meta, **meta_changes})
    return out


@pytest.mark.parametrize("damage", ["missing-tensor", "foreign-trained", "wrong-config", "bad-sites"])
def test_adapter_file_inconsistent_with_itself_is_rejected(tmp_path, damage):
    from safetensors.torch import load_file

    base, model = adapted_net()
    good = rlrr.save_adapter(model, tmp_path / "good.safetensors")
    tensors = load_file(str(good))
    if damage == "missing-tensor":
        del tensors["adapter.blocks.0.fc1.rlrr_s_left"]
        bad, error, words = resave(good, tmp_path / "bad.safetensors", tensors), rlrr.AdapterMismatchError, ["blocks.0.fc1.rlrr_s_left"]
    elif damage == "foreign-trained":
        tensors["trained.classifier.weight"] = torch.zeros(2)
        bad, error, words = resave(good, tmp_path / "bad.safetensors", tensors), rlrr.AdapterMismatchError, ["classifier.weight"]
    elif damage == "wrong-config":
        bad = resave(good, tmp_path / "bad.safetensors", config='{"rank": 1, "colour": "red"}')
        error, words = rlrr.AdapterFileError, ["colour"]
    else:
        bad = resave(good, tmp_path / "bad.safetensors", sites='[{"name": "x"}]')
        error, words = rlrr.AdapterFileError, ["damaged"]
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(error) as info:
        rlrr.load_adapter(fresh, bad)
    assert "bad.safetensors" in str(info.value) and all(w in str(info.value) for w in words)
    assert_unchanged(fresh, before)


def test_save_load_bias_free_layers_and_untraceable_models(tmp_path):
    torch.manual_seed(0)
    for make, inputs in ((BiasFree, (torch.randn(2, 3, 5, 5),)), (Untraceable, (torch.rand(3, 4), torch.randn(2, 2, 5, 5)))):
        base = perturbed(make())
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rlrr.apply(model)
        randomise_adapters(model)
        path = rlrr.save_adapter(model, tmp_path / f"{make.__name__}.safetensors")
        fresh = copy.deepcopy(base)
        rlrr.load_adapter(fresh, path)
        assert site_names(fresh) == site_names(model)
        torch.testing.assert_close(run(fresh, inputs), run(model, inputs), rtol=0, atol=0)


# ----------------------------------------------------------------------------- 8. plan


class Counted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.qkv = nn.Linear(4, 12)
        self.conv = nn.Conv2d(3, 5, (3, 2), bias=False)
        self.ln = nn.LayerNorm(6)

    def forward(self, x, img):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.ln(self.lin(x)), q, k, v, self.conv(img)


def expected_counts(r: int, fused: bool = True) -> dict[str, int]:
    chunks = 3 if fused else 1
    return {
        "lin": r * (4 + 6) + 6,  # r·(in + out) + out
        "qkv": r * (chunks * 4 + 12) + 12,  # r·(chunks·in + out) + out
        "conv": r * (5 * 3 + 3 * 2),  # (O, I, kh, kw) = (5, 3, 3, 2), no bias: r·(O·kh + I·kw)
        "ln": 2 * 6,  # 2·C
    }


@pytest.mark.parametrize("rank, fused", [(1, True), (2, True), (4, True), (3, False)])
def test_plan_counts_parameters_as_apply_creates_them(rank, fused):
    torch.manual_seed(0)
    model = Counted()
    before = snapshot(model)
    the_plan = rlrr.plan(model, rank=rank, fused_chunks=fused)
    assert_unchanged(model, before)
    expected = expected_counts(rank, fused)
    assert the_plan.adapter_parameters == sum(expected.values())
    assert the_plan.base_parameters == sum(p.numel() for p in model.parameters())
    rlrr.apply(model, rank=rank, fused_chunks=fused)
    assert adapter_numel(model) == the_plan.adapter_parameters
    assert {a.site.name: sum(p.numel() for p in a.parameters()) for a in rlrr.adapters_of(model)} == expected


def test_plan_changes_nothing_and_its_table_lists_every_site(net):
    before = snapshot(net)
    the_plan = rlrr.plan(net, rank=2, trainable="head")
    assert_unchanged(net, before)
    assert [s.name for s in the_plan.sites] == NET_SITES[:-1]
    assert the_plan.trainable == ["head"] and the_plan.trainable_parameters == 8 * 5 + 5
    assert any(k.name == "head" and "trainable" in k.reason for k in the_plan.skipped)
    table = the_plan.table()
    lines = table.splitlines()
    for name in NET_SITES[:-1]:
        assert any(line.split()[:1] == [name] for line in lines), name
    assert f"{the_plan.adapter_parameters:,}" in table and "trained in full: head" in table
    assert str(the_plan) == table
    assert the_plan.counts() == {"linear": 8, "conv": 1, "norm": 5}

    rlrr.apply(net, rank=2, trainable="head")
    assert adapter_numel(net) == the_plan.adapter_parameters
    assert grad_names(net) == {n for n, _ in net.named_parameters() if "rlrr_" in n} | {"head.weight", "head.bias"}


def test_plan_sites_can_be_applied_by_apply_plan(net):
    from rlrr.api import apply_plan

    the_plan = rlrr.plan(net, "*.fc?")
    apply_plan(net, the_plan)
    assert site_names(net) == [s.name for s in the_plan.sites]


def test_training_step_updates_only_adapters_and_head(net):
    base = copy.deepcopy(net)
    rlrr.apply(net, trainable="head")
    net.train()
    loss = net(net_input()).square().sum()
    loss.backward()
    for name, p in net.named_parameters():
        if "rlrr_" in name or name.startswith("head."):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    frozen = {k: v for k, v in net.state_dict().items() if "rlrr_" not in k}
    base_state = base.state_dict()
    for k, v in frozen.items():  # originals keep the base values
        key = k.replace(".parametrizations.", ".").replace(".original", "")
        assert torch.equal(v, base_state[key]), k


# ----------------------------------------------------------------------------- 9. ablations


ABLATIONS = [
    {},
    {"rank": 3},
    {"scaling": "left"},
    {"scaling": "right"},
    {"residual": False},
    {"scaling": "left", "residual": False},
    {"lowrank": True},
    {"lowrank": True, "rank": 2},
    {"fused_chunks": False},
    {"shift": False},
]
ABLATION_IDS = [",".join(f"{k}={v}" for k, v in o.items()) or "default" for o in ABLATIONS]


@pytest.mark.parametrize("options", ABLATIONS, ids=ABLATION_IDS)
def test_ablation_switches_fold_exactly(net, options):
    net = net.double()
    base = copy.deepcopy(net)
    rlrr.apply(net, **options)
    randomise_adapters(net)
    x = net_input(F64)
    assert not torch.allclose(run(net, (x,)), run(base, (x,)))
    assert_folds_exactly(net, (x,))
    assert net.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("options", ABLATIONS, ids=ABLATION_IDS)
def test_identity_init_equals_the_base_model_exactly(net, options):
    base = copy.deepcopy(net)
    rlrr.apply(net, init="identity", **options)
    x = net_input()
    assert torch.equal(run(net, (x,)), run(base, (x,)))


def test_paper_init_changes_the_output(net):
    base = copy.deepcopy(net)
    rlrr.apply(net)
    x = net_input()
    assert not torch.allclose(run(net, (x,)), run(base, (x,)))


# ----------------------------------------------------------------------------- 10. dtype


def test_to_float64_after_apply_moves_adapters_too():
    torch.manual_seed(0)
    model = perturbed(BiasFree())
    rlrr.apply(model)
    randomise_adapters(model)
    img = torch.randn(2, 3, 5, 5)
    out32 = run(model, (img,))
    assert model.to(torch.float64) is model
    assert all(p.dtype == F64 for p in model.parameters())
    assert all(b.dtype == F64 for b in model.buffers())
    assert all(p.dtype == F64 for a in rlrr.adapters_of(model) for p in a.parameters())
    out64 = run(model, (img.double(),))
    assert out64.dtype == F64
    torch.testing.assert_close(out64, out32.double(), rtol=1e-4, atol=1e-5)
    assert_folds_exactly(model, (img.double(),))


def test_apply_to_a_float64_model_builds_float64_adapters(net):
    net = net.double()
    rlrr.apply(net, init="identity")
    assert {p.dtype for p in net.parameters()} == {F64}


# ----------------------------------------------------------------------------- hypothesis: random sizes


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    c_in=st.integers(1, 4), c_out=st.integers(1, 5), kh=st.integers(1, 3), kw=st.integers(1, 3),
    hidden=st.integers(1, 6), bias=st.booleans(), rank=st.integers(1, 3), seed=st.integers(0, 2**16),
)
def test_fold_is_exact_for_random_small_layers(c_in, c_out, kh, kw, hidden, bias, rank, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(c_in, c_out, (kh, kw), bias=bias), nn.Flatten(), nn.LazyLinear(hidden, bias=bias),
        nn.LayerNorm(hidden, bias=bias), nn.Linear(hidden, 3, bias=bias),
    ).double()
    x = torch.randn(2, c_in, kh + 1, kw + 2, dtype=F64)
    model(x)  # materialise the lazy layer
    perturbed(model, seed)
    limits = {s.name: s for s in rlrr.plan(model).sites}
    targets = [n for n, s in limits.items() if s.kind == "norm" or rlrr.sites.rescale_class(s.kind).max_rank(s.shape) >= rank]
    if not targets:
        return
    rlrr.apply(model, targets, rank=rank)
    randomise_adapters(model, seed)
    report = assert_folds_exactly(model, (x,))
    created = {f"{n}.bias" for n in targets if not bias and limits[n].kind != "conv"}
    assert set(report.created) == created


# ----------------------------------------------------------------------------- a tiny timm model


def test_timm_test_vit_targets_and_fold():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = perturbed(timm.create_model("test_vit", pretrained=False)).double()
    n_blocks = len(model.blocks)
    qkv = rlrr.plan(model, "blocks.*.attn.qkv")
    assert [s.name for s in qkv.sites] == [f"blocks.{i}.attn.qkv" for i in range(n_blocks)]
    assert all(s.chunks == 3 for s in qkv.sites)
    everything = rlrr.plan(model, trainable="head")
    assert {s.op for s in everything.sites if s.kind == "norm"} <= {"F.layer_norm", "nn.LayerNorm"}
    assert "patch_embed.proj" in [s.name for s in everything.sites]
    # "norm" is the kind (all 13 norms), not the module called norm: "re:norm" is that module
    assert len(rlrr.plan(model, "norm").sites) == 2 * n_blocks + 1
    assert [s.name for s in rlrr.plan(model, "re:norm").sites] == ["norm"]
    rlrr.apply(model, ["blocks.*.attn.qkv", "*.fc1", "re:norm", "patch_embed.proj"], trainable="head", rank=2)
    assert len(rlrr.adapters_of(model)) == 2 * n_blocks + 2
    assert model.forward_features is not None and type(model).__name__ == "VisionTransformer"  # the eager model, not a GraphModule
    randomise_adapters(model)
    x = torch.randn(1, *model.pretrained_cfg["input_size"], dtype=F64)
    assert_folds_exactly(model, (x,), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- SSF on a layer's output


def test_ssf_sites_scale_output_channels_and_fold_exactly(tmp_path):
    torch.manual_seed(0)
    model = perturbed(Net()).double()
    base = copy.deepcopy(model)
    the_plan = rlrr.plan(model, "linear", ssf="stem", trainable="head")
    stem = {s.name: s for s in the_plan.sites}["stem"]
    assert stem.method == "ssf" and "conv (ssf)" in the_plan.table()
    # SSF: one scale and one shift per output channel
    assert the_plan.adapter_parameters - rlrr.plan(model, "linear", trainable="head").adapter_parameters == 2 * stem.shape[0]
    rlrr.apply(model, "linear", ssf="stem", trainable="head")
    randomise_adapters(model)
    (adapter,) = [a for a in rlrr.adapters_of(model) if a.site.name == "stem"]
    x = net_input(F64)
    # the written-out rule: stem's output y becomes s ⊙ y + t along the channel axis
    y = base.stem(x)
    expected = y * adapter.rlrr_scale.view(1, -1, 1, 1) + adapter.rlrr_shift.view(1, -1, 1, 1)
    torch.testing.assert_close(model.stem(x), expected, **TOL)
    out = run(model, (x,))
    path = rlrr.save_adapter(model, tmp_path / "ssf.safetensors")
    other = copy.deepcopy(base)
    rlrr.load_adapter(other, path, trainable="head")
    torch.testing.assert_close(run(other, (x,)), out, rtol=0, atol=0)
    fold(model)
    torch.testing.assert_close(run(model, (x,)), out, **TOL)


class BiasFreeFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return F.linear(x, self.w)  # no bias argument: nothing for a shift to live in


def test_ssf_on_a_site_without_a_bias_to_shift_is_refused():
    model = BiasFreeFunctional()
    before = snapshot(model)
    with pytest.raises(rlrr.ConfigError, match="SSF shifts the layer's bias") as info:
        rlrr.apply(model, ssf="w")
    assert "'w'" in str(info.value)
    assert_unchanged(model, before)
