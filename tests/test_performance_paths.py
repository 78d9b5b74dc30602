"""Correctness of the two speed paths (never their speed: that is benchmarks/).

1. The recompute training path of an adapted `nn.Linear` (adapters/recompute.py): a custom autograd
   Function that recomputes W' in backward. Its gradients are checked with `gradcheck` in float64
   for every weight-scaling variant, and a whole adapted model is checked against the same model
   without the fused forward (parametrize alone): same outputs, same gradients.
2. The eval-mode cache of W' and b' (adapters/base.py): it must serve the right value after any
   change that can make it stale (an optimizer step, load_state_dict, in-place writes to the
   original or to the returned tensor, dtype change, train(), grad enabled), never leak through
   deepcopy, and never become a constant in an exported program.

Small hand-written models in float64 (agreement to ~1e-12), plus timm's ViT-Tiny once.
"""

from __future__ import annotations

import copy
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import rlrr
from adapters import Adapter, LinearRescale, Scaling
from adapters import EAGER, RecomputedLinear, compiled_kernels
from adapters.native import NativeKernels
from adapters.kernels import BUFFERS, CompiledKernels
from rlrr.linear_forward import KERNELS, linear_forward, takes_linear_forward
from export import fold

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
VIT_LINEARS = ["*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2"]


class Block(nn.Module):
    """A norm, a fused qkv-like projection (3 chunks), an MLP; one bias-free linear."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.fc1 = nn.Linear(3 * d, 2 * d, bias=False)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return x + self.fc2(F.gelu(self.fc1(torch.cat([q, k * v, v], dim=-1))))


def block(seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    model = Block().to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    rlrr.apply(model, **options)
    randomise(model, seed + 1)
    return model


def randomise(model: nn.Module, seed: int) -> None:
    """Non-zero adapters everywhere (an identity adapter would hide a wrong formula)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in rlrr.adapters_of(model):
            for name, p in a.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if name == "rlrr_scale" else 0.0))


def without_recompute(model: nn.Module) -> nn.Module:
    """The plain parametrize path (each parametrized module has its own class: only this model changes)."""
    return rlrr.set_recompute(model, False)


def count_fused_calls(monkeypatch) -> list:
    calls: list = []
    original = RecomputedLinear.apply
    monkeypatch.setattr(RecomputedLinear, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def x_input(seed: int = 5, lead=(2, 3), d: int = 6) -> torch.Tensor:
    return torch.randn(*lead, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# 1. The fused Function
# ---------------------------------------------------------------------------------------------

SCALINGS = [Scaling(), Scaling("left"), Scaling("right"), Scaling(residual=False), Scaling("left", residual=False), Scaling(lowrank=True)]


CASES = [(s, r, c) for s in SCALINGS for r, c in [(1, 1), (1, 3), (2, 3)] if s.sides == "both" or r == 1]  # one-sided: rank 1


def scaling_id(v) -> str:
    return f"{v.sides}-res{int(v.residual)}-lowrank{int(v.lowrank)}" if isinstance(v, Scaling) else str(v)


@pytest.mark.parametrize("scaling,rank,chunks", CASES, ids=scaling_id)
@pytest.mark.parametrize("bias", ["adapted", "plain", "none"])
def test_fused_function_gradcheck(scaling: Scaling, rank: int, chunks: int, bias: str, kernels=None) -> None:
    g = torch.Generator().manual_seed(rank * 10 + chunks)
    weight = nn.Parameter(torch.randn(6, 4, generator=g, dtype=F64), requires_grad=False)
    adapter = LinearRescale(weight, rank=rank, chunks=chunks, scaling=scaling, shift=bias == "adapted")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    b = None if bias == "none" else nn.Parameter(torch.randn(6, generator=g, dtype=F64), requires_grad=bias == "plain")
    params = list(adapter.parameters())
    x = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    inputs = (x, *params) + ((b,) if bias == "plain" else ())

    def fn(x, *rest):  # gradcheck perturbs the adapter's own parameters, in place
        return RecomputedLinear.apply(x, weight, b, adapter, bias == "adapted", kernels, *params)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)
    with torch.no_grad():  # and the forward is the parametrization's formula
        expected = F.linear(x, adapter.effective_weight(weight), adapter.effective_bias(b) if bias == "adapted" else b)
    torch.testing.assert_close(fn(x, *params), expected, **TOL)


@pytest.mark.parametrize("scaling,rank,chunks", [(Scaling(), 1, 3), (Scaling(), 2, 1), (Scaling("right", residual=False), 1, 1)], ids=["r1c3", "r2", "right-nores"])
def test_fused_function_double_backward(scaling: Scaling, rank: int, chunks: int, kernels=None) -> None:
    """backward(create_graph=True), e.g. a gradient penalty, differentiates the backward itself."""
    g = torch.Generator().manual_seed(11)
    weight = nn.Parameter(torch.randn(6, 4, generator=g, dtype=F64), requires_grad=False)
    adapter = LinearRescale(weight, rank=rank, chunks=chunks, scaling=scaling)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    bias = nn.Parameter(torch.randn(6, generator=g, dtype=F64), requires_grad=False)
    params = list(adapter.parameters())
    x = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, *ps: RecomputedLinear.apply(x, weight, bias, adapter, True, kernels, *params), (x, *params), eps=1e-6, atol=1e-7)


def test_fused_function_gradient_of_an_unfrozen_base_weight(kernels=None) -> None:
    g = torch.Generator().manual_seed(3)
    weight = nn.Parameter(torch.randn(6, 4, generator=g, dtype=F64))  # the user unfroze W: dW = dW' ⊙ (1 + M)
    adapter = LinearRescale(weight, chunks=3)
    params = list(adapter.parameters())
    x = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, *ps: RecomputedLinear.apply(x, w, None, adapter, False, kernels, *params), (x, weight, *params), eps=1e-6, atol=1e-8)


def test_apply_installs_the_fused_forward_on_plain_linears_only() -> None:
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.LayerNorm(4)).to(F64)
    rlrr.apply(model)
    assert type(model[0]).forward is linear_forward
    assert type(model[1]).forward is Custom.forward  # a subclass with its own forward keeps it
    assert not takes_linear_forward(model[2])
    fold(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is Custom  # fold restores the classes


@pytest.mark.parametrize("options", [{}, {"rank": 2}, {"shift": False}, {"fused_chunks": False}, {"scaling": "left"}, {"lowrank": True}],
                         ids=["default", "rank2", "noshift", "unchunked", "left", "lowrank"])
def test_fused_model_equals_parametrize_path(options, monkeypatch) -> None:
    fused, plain = block(**options), without_recompute(block(**options))
    x = x_input()
    calls = count_fused_calls(monkeypatch)
    y_fused = fused(x)
    assert len(calls) == 3  # qkv, the bias-free fc1 (a created bias), fc2
    y_plain = plain(x)
    torch.testing.assert_close(y_fused, y_plain, **TOL)
    seed = torch.randn(y_plain.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    (y_fused * seed).sum().backward()
    (y_plain * seed).sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], **TOL)
        else:
            assert p.grad is None, n


def test_fused_path_is_not_taken_without_grad_or_when_nothing_trains(monkeypatch) -> None:
    model = block()
    calls = count_fused_calls(monkeypatch)
    with torch.no_grad():
        model(x_input())
    for p in model.parameters():
        p.requires_grad_(False)
    model(x_input())  # grad enabled, but nothing requires it
    assert calls == []


def test_fused_training_under_torch_compile_matches_eager() -> None:
    eager, compiled_model = block(), block()
    compiled = torch.compile(compiled_model, backend="eager")
    x = x_input()
    eager(x).square().sum().backward()
    compiled(x).square().sum().backward()
    for (n, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, **TOL)


@pytest.mark.parametrize("compile", [False, "aot_eager"], ids=["eager", "compiled"])
def test_autocast_runs_the_gemms_in_bf16_and_the_formula_in_float32(compile, monkeypatch) -> None:
    """Under autocast the recompute path casts as F.linear would; the parametrize path computes M in
    bf16 (autocast's bmm), so the two agree to bf16 precision, not exactly."""
    fused, plain = rlrr.set_recompute(block(), True, compile=compile), without_recompute(block())
    fused.float(), plain.float()
    x = x_input().float().requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    calls = count_fused_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fused, y_plain = fused(x), plain(x_plain)
    assert len(calls) == 3 and y_fused.dtype == y_plain.dtype
    scale = y_plain.abs().max().item()
    torch.testing.assert_close(y_fused, y_plain, rtol=0, atol=3e-2 * scale)
    y_fused.float().square().sum().backward()
    y_plain.float().square().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=0, atol=5e-2 * x_plain.grad.abs().max().item())
    for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
        if p.requires_grad:
            assert p.grad.dtype == torch.float32, n
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=5e-2 * q.grad.abs().max().item(), msg=n)


def test_autocast_path_is_f_linear_on_the_float32_formula_cast_to_bf16() -> None:
    """One layer under autocast equals the explicit reference: W' in float32, cast, F.linear in bf16."""
    g = torch.Generator().manual_seed(4)
    weight = nn.Parameter(torch.randn(6, 4, generator=g), requires_grad=False)
    bias = nn.Parameter(torch.randn(6, generator=g), requires_grad=False)
    adapter = LinearRescale(weight, chunks=3)
    with torch.no_grad():
        adapter.rlrr_shift.normal_(generator=g)
    params = list(adapter.parameters())
    x = torch.randn(5, 4, generator=g, requires_grad=True)
    seed = torch.randn(5, 6, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = RecomputedLinear.apply(x, weight, bias, adapter, True, None, *params)
    (y * seed).sum().backward()
    got = [t.grad.clone() for t in (x, *params)]
    for t in (x, *params):
        t.grad = None
    ref = F.linear(x.to(torch.bfloat16), adapter.effective_weight(weight).to(torch.bfloat16), adapter.effective_bias(bias).to(torch.bfloat16))
    (ref * seed).sum().backward()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for a, b in zip(got, (x.grad, *(p.grad for p in params))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def test_in_place_change_between_forward_and_backward_is_caught() -> None:
    model = block()
    y = model(x_input())
    with torch.no_grad():
        rlrr.adapters_of(model)[1].rlrr_s_left.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_deepcopy_trains_independently_and_folds_without_breaking_the_original() -> None:
    model = block()
    clone = copy.deepcopy(model)
    x = x_input()
    torch.testing.assert_close(clone(x), model(x), **TOL)
    opt = torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=0.1)
    clone(x).square().sum().backward()
    opt.step()
    before = model(x).detach()
    fold(clone)
    torch.testing.assert_close(model(x), before, **TOL)  # the original is untouched and still fused
    assert type(model.qkv).forward is linear_forward
    model(x).sum().backward()
    assert rlrr.adapters_of(model)[1].rlrr_s_left.grad is not None


def test_vit_tiny_fused_equals_parametrize_path_in_float32() -> None:
    def build():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or "head" in n:
                    p.normal_(0.5 if n.endswith("weight") else 0.0, 0.5)
        rlrr.apply(model, VIT_LINEARS + ["norm"], trainable="head", ssf="patch_embed.proj")
        randomise(model, 1)
        return model

    fused, plain = build(), without_recompute(build())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y_fused, y_plain = fused(x), plain(x)
    torch.testing.assert_close(y_fused, y_plain, rtol=0, atol=1e-5 * y_plain.abs().max().item())
    y_fused.square().sum().backward()
    y_plain.square().sum().backward()
    for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(), msg=n)


# ---------------------------------------------------------------------------------------------
# 1b. Compiled kernels (adapters/kernels.py): the same formula through torch.compile. CI traces them
# with the "aot_eager" backend (dynamo and AOTAutograd, no code generated: seconds); the C++ code
# inductor generates is compiled only with RLRR_TEST_INDUCTOR=1 (tens of seconds) and by the benchmark.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo keeps at most 8 compiled versions of one function."""
    torch._dynamo.reset()
    yield


class CountingBackend:
    """aot_eager, counting the graphs it is given (0 would mean the kernels silently ran eagerly)."""

    __name__ = "counting aot_eager"

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


COMPILED_CASES = [(Scaling(), 1, 3), (Scaling(), 2, 1), (Scaling("left"), 1, 3), (Scaling("right", residual=False), 1, 1), (Scaling(lowrank=True), 1, 3)]


@pytest.mark.parametrize("scaling,rank,chunks", COMPILED_CASES, ids=scaling_id)
def test_compiled_kernels_gradcheck(scaling: Scaling, rank: int, chunks: int) -> None:
    backend = CountingBackend()
    kernels = CompiledKernels(backend)
    test_fused_function_gradcheck(scaling, rank, chunks, "adapted", kernels=kernels)
    assert backend.graphs == 2 and kernels.failed is None  # forward and backward kernels, compiled once each


def test_compiled_kernels_gradient_of_an_unfrozen_base_weight() -> None:
    backend = CountingBackend()
    kernels = CompiledKernels(backend)
    test_fused_function_gradient_of_an_unfrozen_base_weight(kernels)
    assert backend.graphs == 2 and kernels.failed is None


def test_compiled_kernels_double_backward_falls_back_to_autograd() -> None:
    kernels = CompiledKernels(CountingBackend())
    g = torch.Generator().manual_seed(11)
    weight = nn.Parameter(torch.randn(6, 4, generator=g, dtype=F64), requires_grad=False)
    adapter = LinearRescale(weight, chunks=3)
    params = list(adapter.parameters())
    x = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, *ps: RecomputedLinear.apply(x, weight, None, adapter, False, kernels, *params), (x, *params), eps=1e-6, atol=1e-7)


class CountingNative(NativeKernels):
    """The native kernels, counting the calls that reach the C++ loops."""

    def __init__(self) -> None:
        super().__init__()
        self.loops = 0

    def library(self):
        library = super().library()
        self.loops += library is not None
        return library


@pytest.mark.parametrize("scaling,rank,chunks", CASES, ids=scaling_id)
def test_eager_kernels_gradcheck(scaling: Scaling, rank: int, chunks: int) -> None:
    """The op-by-op path (the default's fallback, `native=False`) on every variant."""
    test_fused_function_gradcheck(scaling, rank, chunks, "adapted", kernels=EAGER)


@pytest.mark.parametrize("rank,chunks", [(1, 1), (1, 3), (2, 3)])
def test_native_loops_gradcheck(rank: int, chunks: int) -> None:
    """The paper form takes the C++ loops (built here, as on first use) and they pass gradcheck in float64."""
    kernels = CountingNative()
    test_fused_function_gradcheck(Scaling(), rank, chunks, "adapted", kernels=kernels)
    assert kernels.failed is None and kernels.loops > 0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rank,chunks", [(1, 1), (1, 3), (3, 2)])
def test_native_loops_equal_the_op_by_op_kernels(dtype, rank: int, chunks: int) -> None:
    """W' and the gradients to rounding (fused multiply-adds, sums in another order), at ViT-like row widths."""
    g = torch.Generator().manual_seed(rank + chunks)
    weight = torch.randn(6 * chunks * 8, 96, generator=g, dtype=F64).to(dtype)
    adapter = LinearRescale(weight, rank=rank, chunks=chunks).to(dtype)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    dw = torch.randn(weight.shape, generator=g, dtype=F64).to(dtype)
    wanted = [adapter.rlrr_s_left, adapter.rlrr_s_right]
    kernels = CountingNative()
    with torch.no_grad():
        w_native = kernels.weight(adapter, weight).clone()
        w_both, grads = kernels.weight_and_grads(adapter, weight, dw.clone(), wanted, False)
        w_both = w_both.clone()  # (a CPU buffer, which the next call overwrites)
        w_eager = EAGER.weight(adapter, weight).clone()
        _, expected = EAGER.weight_and_grads(adapter, weight, dw.clone(), wanted, False)
    assert kernels.loops == 2
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(w_native, w_eager, **tol)  # (torch's addcmul may fuse the multiply-add: one rounding fewer)
    torch.testing.assert_close(w_both, w_native, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rank,chunks", [(1, 1), (1, 3), (3, 2)])
def test_native_fold_equals_the_op_by_op_fold(monkeypatch, dtype, rank: int, chunks: int) -> None:
    """`fold_into` writes W' over W through the C++ loop, equal to Eq. 20 op by op; a view it cannot take stays untouched."""
    import adapters.native as native

    g = torch.Generator().manual_seed(7 * rank + chunks)
    weight = torch.randn(6 * chunks * 8, 96, generator=g, dtype=F64).to(dtype)
    adapter = LinearRescale(weight, rank=rank, chunks=chunks).to(dtype)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    kernels = CountingNative()
    monkeypatch.setattr(native, "NATIVE", kernels)
    folded, blocks = weight.clone(), weight.clone()
    version = folded._version
    adapter.fold_into(folded, is_bias=False)
    assert kernels.loops == 1 and folded._version > version  # (autograd sees the in-place write)
    adapter.fold_into(blocks, is_bias=False, rows=5)  # (the op-by-op blocks)
    assert kernels.loops == 1
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(folded, adapter.folded(weight, is_bias=False), **tol)
    torch.testing.assert_close(blocks, adapter.folded(weight, is_bias=False), **tol)
    assert not folded.equal(weight)
    transposed = weight.t().contiguous().t()  # not contiguous: the loop does not take it
    before = transposed.clone()
    assert not kernels.fold_into(adapter, transposed) and transposed.equal(before)


def test_native_build_loads_a_finished_build_by_name_only(monkeypatch, tmp_path) -> None:
    """A build leaves `ready` naming its library; a `ready` naming anything else (a path, a missing file) rebuilds."""
    import adapters.native as native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = native.build_directory()
    assert folder.parent == tmp_path and not folder.exists()
    native.build()
    ready = folder / "ready"
    library = folder / ready.read_text()
    assert library.is_file() and library.parent == folder
    (tmp_path / "elsewhere.so").write_bytes(b"not a library")
    ready.write_text("../elsewhere.so")
    assert native.build().rlrr_weight_f32 is not None  # rebuilt in its folder, not loaded from the path
    assert (folder / ready.read_text()).parent == folder and "/" not in ready.read_text()


def test_native_loops_take_only_the_paper_form() -> None:
    """Other scalings, a trainable W and a differentiable backward go op by op; the result is the same."""
    kernels = CountingNative()
    for scaling in (Scaling("left"), Scaling(residual=False), Scaling(lowrank=True)):
        test_fused_function_gradcheck(scaling, 1, 3, "adapted", kernels=kernels)
    assert kernels.loops == 0
    test_fused_function_gradient_of_an_unfrozen_base_weight(kernels)  # (W' in forward may take the loop; dW may not)
    test_fused_function_double_backward(Scaling(), 1, 3, kernels)


def test_native_build_failure_falls_back_to_op_by_op_with_one_warning(monkeypatch) -> None:
    import adapters.native as native

    kernels = NativeKernels()
    monkeypatch.setattr(native, "build", lambda verbose=False: (_ for _ in ()).throw(RuntimeError("no compiler here")))
    model, plain = block(), without_recompute(block())
    rlrr.set_recompute(model)
    setattr(type(model.qkv), KERNELS, kernels)
    x = x_input()
    with pytest.warns(UserWarning, match="could not build the native training loop.*no compiler here"):
        y = model(x)
    assert kernels.failed and "no compiler here" in kernels.failed
    y.square().sum().backward()  # no second warning
    plain(x).square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **TOL)


def test_set_recompute_native_false_keeps_to_op_by_op() -> None:
    model = rlrr.set_recompute(block(), native=False)
    assert all(type(m).__dict__.get(KERNELS) is EAGER for m in model.modules() if type(m).__dict__.get("forward") is linear_forward)
    rlrr.set_recompute(model)
    assert not any(KERNELS in type(m).__dict__ for m in model.modules())


@pytest.mark.parametrize("kwargs", [{"enabled": "no"}, {"native": 0}, {"native": None}, {"compile": 3}])
def test_set_recompute_refuses_options_that_are_not_what_it_takes(kwargs) -> None:
    """A truthy string or a number must not silently pick a path: a ConfigError, and the model untouched."""
    model = block()
    before = {type(m): dict(type(m).__dict__) for m in model.modules()}
    kwargs = dict(kwargs)  # (the parameter's dict is shared between runs)
    enabled = kwargs.pop("enabled", True)
    with pytest.raises(rlrr.ConfigError, match="set_recompute"):
        rlrr.set_recompute(model, enabled, **kwargs)
    assert {type(m): dict(type(m).__dict__) for m in model.modules()} == before


def test_compiled_model_equals_parametrize_path() -> None:
    backend = CountingBackend()
    compiled_model, plain = rlrr.set_recompute(block(), True, compile=backend), without_recompute(block())
    x = x_input()
    seed = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    for _ in range(2):  # the second step reuses the compiled code and the CPU buffers
        y, y_plain = compiled_model(x), plain(x)
        torch.testing.assert_close(y, y_plain, **TOL)
        (y * seed).sum().backward()
        (y_plain * seed).sum().backward()
    for (n, p), q in zip(compiled_model.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=n)
    assert backend.graphs == 4  # forward and backward kernels, for 3 chunks (qkv) and 1 (fc1, fc2)


def test_compile_setting_is_per_model_and_undone_by_set_recompute() -> None:
    model, other = block(), block()
    rlrr.set_recompute(model, True, compile="aot_eager")
    assert type(model.qkv).__dict__[KERNELS].name == "compiled (aot_eager)"
    assert KERNELS not in type(other.qkv).__dict__
    rlrr.set_recompute(model, True)  # eager kernels again
    assert KERNELS not in type(model.qkv).__dict__ and type(model.qkv).forward is linear_forward
    rlrr.set_recompute(model, True, compile="aot_eager")
    rlrr.set_recompute(model, False)
    assert "forward" not in type(model.qkv).__dict__ and KERNELS not in type(model.qkv).__dict__
    fold(rlrr.set_recompute(other, True, compile="aot_eager"))
    assert type(other.qkv) is nn.Linear


def test_compiled_kernels_fall_back_to_eager_when_compiling_fails() -> None:
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    kernels = CompiledKernels(broken)
    model, plain = rlrr.set_recompute(block(), True), without_recompute(block())
    for m in model.modules():
        if KERNELS in type(m).__dict__ or type(m).__dict__.get("forward") is linear_forward:
            setattr(type(m), KERNELS, kernels)
    x = x_input()
    with pytest.warns(UserWarning, match="failed, using eager ones"):
        y = model(x)
    y.sum().backward()
    y_plain = plain(x)
    y_plain.sum().backward()
    torch.testing.assert_close(y, y_plain, **TOL)
    assert kernels.failed and "no C++ compiler" in kernels.failed
    for p, q in zip(model.parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **TOL)


def test_cpu_buffers_are_reused_and_never_returned() -> None:
    """W' and dW' live in per-thread buffers; nothing handed back to autograd or the caller aliases one."""
    model = rlrr.set_recompute(block(), True, compile="aot_eager")
    x = x_input().requires_grad_()
    y = model(x)
    y.sum().backward()
    buffers = {t.untyped_storage().data_ptr() for t in BUFFERS.store.values()}
    assert buffers
    owned = [y, x.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    assert not any(t.untyped_storage().data_ptr() in buffers for t in owned)
    before = dict(BUFFERS.store)
    model(x).sum().backward()
    assert all(BUFFERS.store[k] is v for k, v in before.items())  # the second step allocated none


def test_compiled_kernels_leave_ddp_torch_compile_and_export_alone(tmp_path) -> None:
    """DDP (one gloo process), a whole-model torch.compile and torch.export of the unfolded model still work."""
    import torch.distributed as dist

    model, plain = rlrr.set_recompute(block(), True, compile="aot_eager"), block()
    x = x_input()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp(x).square().sum().backward()
    finally:
        dist.destroy_process_group()
    plain(x).square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **TOL)
    whole = torch.compile(block(), backend="eager")
    rlrr.set_recompute(whole._orig_mod, True, compile="aot_eager")
    torch.testing.assert_close(whole(x), plain(x), **TOL)
    with torch.no_grad():
        exported = torch.export.export(model.eval(), (x,)).module()
        torch.testing.assert_close(exported(x), plain.eval()(x), **TOL)


@pytest.mark.skipif(not os.environ.get("RLRR_TEST_INDUCTOR"), reason="compiles C++ with inductor (tens of seconds): RLRR_TEST_INDUCTOR=1")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_inductor_kernels_match_eager(dtype) -> None:
    model, plain = rlrr.set_recompute(block(), True, compile=True).to(dtype), without_recompute(block()).to(dtype)
    x = x_input().to(dtype)
    def tol(t):  # float32: a few ulp of the largest entry (sums of products in another order)
        return TOL if dtype == F64 else {"rtol": 1e-4, "atol": 1e-5 * t.abs().max().item()}

    y, y_plain = model(x), plain(x)
    torch.testing.assert_close(y, y_plain, **tol(y_plain))
    y.square().sum().backward()
    y_plain.square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **tol(q.grad))
    assert compiled_kernels().failed is None


# ---------------------------------------------------------------------------------------------
# 2. The eval-mode cache
# ---------------------------------------------------------------------------------------------


def evaluated(model: nn.Module) -> nn.Module:
    model.eval()
    with torch.no_grad():
        model(x_input())
    return model


def fresh_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model computes with no cache at all (train mode clears it; nothing here depends on mode)."""
    twin = copy.deepcopy(model).train()
    with torch.no_grad():
        return twin(x)


def test_cache_serves_the_same_tensor_in_eval_without_grad() -> None:
    model = evaluated(block())
    with torch.no_grad():
        assert model.qkv.weight is model.qkv.weight
        assert model.norm.bias is model.norm.bias
    with torch.inference_mode():
        assert model.qkv.weight is model.qkv.weight
    assert sum(len(a._cache) for a in rlrr.adapters_of(model)) == 8  # 3 linears (fc1's created bias too), 1 norm: weights and biases


def test_cache_is_off_with_grad_and_in_train_mode() -> None:
    model = evaluated(block())
    w = model.qkv.weight  # grad enabled: computed, with a graph to the adapter
    assert w.requires_grad and w.grad_fn is not None
    assert not model.qkv.parametrizations.weight[0]._cache
    model(x_input())  # a forward with grad enabled (the fused path for the linears) drops every entry
    assert all(not a._cache for a in rlrr.adapters_of(model))
    evaluated(model)
    model.train()
    assert all(not a._cache for a in rlrr.adapters_of(model))
    with torch.no_grad():
        model(x_input())
        assert model.qkv.weight is not model.qkv.weight  # train mode recomputes
    assert all(not a._cache for a in rlrr.adapters_of(model))


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict", "original_in_place", "adapter_in_place", "returned_in_place", "float32"])
def test_cache_is_never_stale(change: str) -> None:
    model = evaluated(block())
    x = x_input()
    with torch.no_grad():
        before = model(x)
    if change == "optimizer_step":
        model.train()
        model(x).square().sum().backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        model.eval()
    elif change == "load_state_dict":
        model.load_state_dict(block(seed=7).state_dict())
    with torch.no_grad():
        if change == "original_in_place":
            model.qkv.parametrizations.weight.original.mul_(2)
        elif change == "adapter_in_place":
            rlrr.adapters_of(model)[0].rlrr_shift.add_(1.0)  # the norm's shift: only its bias changes
        elif change == "returned_in_place":
            model.fc2.weight.mul_(3)  # a write into the cached W' itself must not stick
        elif change == "float32":
            model.float()
            x = x.float()
        got = model(x)
        assert model.qkv.weight is model.qkv.weight  # cached again
    torch.testing.assert_close(got, fresh_outputs(model, x), rtol=0, atol=0)
    if change == "returned_in_place":
        torch.testing.assert_close(got, before, rtol=0, atol=0)
    elif change == "float32":
        assert all(v[1].dtype == torch.float32 for a in rlrr.adapters_of(model) for v in a._cache.values())
    else:
        assert not torch.allclose(got, before)


def test_deepcopy_does_not_carry_the_cache_and_the_copy_is_right() -> None:
    model = evaluated(block())
    clone = copy.deepcopy(model)
    assert all(not a._cache for a in rlrr.adapters_of(clone))
    with torch.no_grad():
        rlrr.adapters_of(clone)[1].rlrr_s_right.mul_(-1)
        x = x_input()
        assert not torch.allclose(clone(x), model(x))
        torch.testing.assert_close(model(x), fresh_outputs(model, x), rtol=0, atol=0)


def test_fold_after_cached_eval_equals_the_unmerged_model() -> None:
    model = evaluated(block())
    x = x_input()
    with torch.no_grad():
        unmerged = model(x)
        folded = fold(model)(x)
    torch.testing.assert_close(folded, unmerged, **TOL)


def test_apply_on_a_model_in_eval_mode_starts_in_eval() -> None:
    torch.manual_seed(0)
    model = Block().to(F64).eval()
    rlrr.apply(model)
    assert not any(a.training for a in rlrr.adapters_of(model))
    with torch.no_grad():
        assert model.qkv.weight is model.qkv.weight


def test_exported_program_reads_the_parameters_not_a_cached_constant() -> None:
    model = evaluated(block())
    x = x_input()
    with torch.no_grad():
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(exported(x), model(x), **TOL)
        before = exported(x)
        params = dict(exported.named_parameters())
        [name] = [n for n in params if n.startswith("fc2.") and n.endswith("rlrr_s_right")]
        params[name].mul_(-1)  # were W' a constant of the program, the output would not move
        assert not torch.allclose(exported(x), before)
        rlrr.adapters_of(model)[-1].rlrr_s_right.mul_(-1)
        torch.testing.assert_close(exported(x), model(x), **TOL)
