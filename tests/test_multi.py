"""Named adapters on one model and their combination (App. H), checked against the formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rlrr
from export import fold_with_report

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


class Tiny(nn.Module):
    """One linear, one LayerNorm and a head: the three kinds of adapter parameters."""

    def __init__(self, dim: int = 5, out: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, out)
        self.norm = nn.LayerNorm(out)
        self.head = nn.Linear(out, 3)

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rlrr_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def with_adapters(ranks: list[int], seed: int = 0) -> tuple[Tiny, Tiny, list[dict]]:
    """A base model, and its adapted twin holding named adapters a0, a1, ... with random values."""
    base = tiny(seed)
    model = copy.deepcopy(base)
    names = []
    for i, rank in enumerate(ranks):
        name = f"a{i}"
        rlrr.add_adapter(model, name, ["lin", "norm"], rank=rank) if i else rlrr.apply(model, ["lin", "norm"], rank=rank)
        names.append(name if i else "default")
    states = []
    for i, name in enumerate(names):
        rlrr.set_active(model, name)
        randomise(model, seed * 100 + i)
        states.append({k: v.detach().clone() for k, v in rlrr.get_adapter(model, name).tensors.items()})
    return base, model, states


def written_out(base: Tiny, states: list[dict], weights: list[float], method: str, x: torch.Tensor) -> torch.Tensor:
    """App. H in PyTorch's (out, in) layout, written independently of the library."""
    w, b = base.lin.weight, base.lin.bias
    g, beta = base.norm.weight, base.norm.bias
    L = [s["lin.rlrr_s_left"][0] for s in states]  # (r, in); one chunk
    R = [s["lin.rlrr_s_right"] for s in states]  # (out, r)
    f = sum(wi * s["lin.rlrr_shift"] for wi, s in zip(weights, states))
    S = [s["norm.rlrr_scale"] for s in states]
    T = sum(wi * s["norm.rlrr_shift"] for wi, s in zip(weights, states))
    if method == "linear":  # formula 1: (Σ w R)(Σ w L)
        m = sum(wi * r for wi, r in zip(weights, R)) @ sum(wi * l for wi, l in zip(weights, L))
        s = sum(wi * si for wi, si in zip(weights, S))
    else:  # formula 2: Σ R_i L_i
        m = sum(r @ l for r, l in zip(R, L))
        s = 1 + sum(si - 1 for si in S)
    y = F.linear(x, w + m * w, b + f)
    y = F.layer_norm(y, (6,), g * s, beta * s + T)
    return base.head(y)


@settings(max_examples=20, deadline=None)
@given(rank=st.integers(1, 3), weights=st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=3), seed=st.integers(0, 1000))
def test_formula_1_forward_matches_app_h(rank, weights, seed):
    base, model, states = with_adapters([rank] * len(weights), seed)
    names = ["default"] + [f"a{i}" for i in range(1, len(weights))]
    rlrr.combine(model, names, weights, method="linear", name="c")
    rlrr.set_active(model, "c")
    x = torch.randn(4, 5, dtype=F64)
    out = model(x)
    torch.testing.assert_close(out, written_out(base, states, weights, "linear", x), **TOL)
    with pytest.warns(UserWarning, match="dropped the others"):
        _, report = fold_with_report(model)  # folding the combination equals the combined unmerged model
    torch.testing.assert_close(model(x), out, **TOL)
    assert "c" not in report.dropped and set(report.dropped) == set(names)


@settings(max_examples=20, deadline=None)
@given(ranks=st.lists(st.integers(1, 3), min_size=2, max_size=3), weights=st.lists(st.floats(-2, 2), min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_formula_2_forward_matches_app_h(ranks, weights, seed):
    weights = weights[: len(ranks)]
    base, model, states = with_adapters(ranks, seed)
    names = ["default"] + [f"a{i}" for i in range(1, len(ranks))]
    rlrr.combine(model, names, weights, method="concat", name="c")
    assert rlrr.get_adapter(model, "c").config.rank == sum(ranks)
    rlrr.set_active(model, "c")
    x = torch.randn(4, 5, dtype=F64)
    out = model(x)
    torch.testing.assert_close(out, written_out(base, states, weights, "concat", x), **TOL)
    with pytest.warns(UserWarning, match="dropped the others"):
        fold_with_report(model)
    torch.testing.assert_close(model(x), out, **TOL)


@pytest.mark.parametrize("method", ["linear", "concat"])
def test_one_adapter_combined_with_weight_one_is_itself_exactly(method):
    _, model, _ = with_adapters([2])
    x = torch.randn(4, 5, dtype=F64)
    rlrr.set_active(model, "default")
    before = model(x)
    rlrr.combine(model, ["default"], [1.0], method=method, name="same")
    rlrr.set_active(model, "same")
    assert torch.equal(model(x), before)


def test_several_active_is_their_sum_formula_2():
    base, model, states = with_adapters([1, 2])
    rlrr.set_active(model, ["default", "a1"])
    assert rlrr.active_adapters(model) == ("default", "a1")
    x = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(model(x), written_out(base, states, [1.0, 1.0], "concat", x), **TOL)


def test_lifecycle_add_list_activate_disable_delete():
    base, model, _ = with_adapters([1, 1])
    x = torch.randn(4, 5, dtype=F64)
    assert rlrr.list_adapters(model) == ["default", "a1"]
    assert rlrr.active_adapters(model) == ("a1",)
    y1 = model(x)
    rlrr.set_active(model, "default")
    y0 = model(x)
    assert not torch.allclose(y0, y1)
    rlrr.disable_adapters(model)
    assert rlrr.adapters_of(model) == [] and rlrr.active_adapters(model) == ()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # the base function, exactly
    rlrr.set_active(model, "a1")
    torch.testing.assert_close(model(x), y1, rtol=0, atol=0)
    rlrr.delete_adapter(model, "a1")
    assert rlrr.list_adapters(model) == ["default"] and rlrr.adapters_of(model) == []
    rlrr.set_active(model, "default")
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_training_the_live_adapter_is_kept_when_switching():
    _, model, _ = with_adapters([1, 1])
    rlrr.set_active(model, "default")
    x = torch.randn(4, 5, dtype=F64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().sum().backward()
    opt.step()
    trained = model(x).detach()
    rlrr.set_active(model, "a1")
    rlrr.set_active(model, "default")
    torch.testing.assert_close(model(x), trained, rtol=0, atol=0)


def test_save_and_load_several(tmp_path):
    _, model, _ = with_adapters([1, 2])
    x = torch.randn(4, 5, dtype=F64)
    outputs = {}
    for name in ("default", "a1"):
        rlrr.set_active(model, name)
        outputs[name] = model(x)
    paths = rlrr.save_adapters(model, tmp_path)
    assert sorted(p.name for p in paths) == ["a1.safetensors", "default.safetensors"]
    fresh = tiny(0)
    rlrr.load_adapters(fresh, sorted(paths))
    assert rlrr.list_adapters(fresh) == ["a1", "default"] and rlrr.active_adapters(fresh) == ("a1",)
    for name in ("default", "a1"):
        rlrr.set_active(fresh, name)
        torch.testing.assert_close(fresh(x), outputs[name], rtol=0, atol=0)


def test_errors_say_what_is_wrong():
    _, model, _ = with_adapters([1, 2])
    with pytest.raises(rlrr.UnknownAdapterError, match=r"no adapter named \['nope'\].*default"):
        rlrr.set_active(model, "nope")
    with pytest.raises(rlrr.ConfigError, match="equal ranks; got \\[1, 2\\]"):
        rlrr.combine(model, ["default", "a1"], method="linear")
    with pytest.raises(rlrr.ConfigError, match="at least one adapter"):
        rlrr.combine(model, [])
    with pytest.raises(rlrr.ConfigError, match="one finite weight per adapter"):
        rlrr.combine(model, ["default", "a1"], [1.0], method="concat")
    with pytest.raises(rlrr.ConfigError, match="already exists"):
        rlrr.add_adapter(model, "a1")
    rlrr.add_adapter(model, "linear_only", ["lin"])
    with pytest.raises(rlrr.AdapterMismatchError, match="different placements.*norm"):
        rlrr.combine(model, ["default", "linear_only"], method="concat")
    rlrr.add_adapter(model, "left", ["lin", "norm"], scaling="left")
    with pytest.raises(rlrr.ConfigError, match="different options"):
        rlrr.combine(model, ["default", "left"], method="concat")
    assert "combined" not in rlrr.list_adapters(model)


def test_apply_on_a_model_whose_adapters_are_all_disabled_is_refused():
    _, model, _ = with_adapters([1])
    rlrr.disable_adapters(model)
    with pytest.raises(rlrr.AlreadyAdaptedError, match="named adapters"):
        rlrr.apply(model)
    rlrr.add_adapter(model, "more")  # the way to add one
    assert rlrr.list_adapters(model) == ["default", "more"] and rlrr.active_adapters(model) == ("more",)


def test_a_model_holding_a_combination_deep_copies():
    _, model, _ = with_adapters([1, 1])
    rlrr.combine(model, ["default", "a1"], [0.5, 0.5], name="mix")
    rlrr.set_active(model, "mix")
    x = torch.randn(4, 5, dtype=F64)
    clone = copy.deepcopy(model)
    assert rlrr.list_adapters(clone) == ["default", "a1", "mix"]
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
