"""Property tests for adapters/: the RLRR formulas checked against the paper, written out here.

The reference formulas in this file are deliberately independent of `adapters.scale_matrix` and
`adapters.rescale`: explicit loops or einsum over indices, in float64, in the (1 + M) ⊙ W form of
Eq. 20 (the library computes W + M ⊙ W). Kernel flattening is re-derived from index arithmetic.
Every adapter is randomised before a fold or formula check, since zero adapters would pass trivially.

Tolerances: a result is compared with `torch.testing.assert_close(rtol=tol, atol=tol * scale)`, where
`scale` bounds the magnitude of every intermediate (|W| (1 + |M|) + |M| for weights, the same layer
run on |x| with those bounds for outputs). tol is a small multiple of the dtype's unit roundoff:
float64 1e-12, float32 1e-6 (formulas) / 1e-5 (layer outputs), bfloat16 2e-2.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapters import (
    BiasOf,
    ConvRescale,
    LinearRescale,
    NormScaleShift,
    Scaling,
    adapter_parameters,
    flatten_kernel,
    rescale_vjp,
    scale_matrix_vjp,
    unflatten_kernel,
)

F64 = torch.float64
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
FORMULA_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}
FOLD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
MAX_DIM = 12  # matrix sides
MAX_RANK = 4

PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(1, MAX_DIM)
ranks = st.integers(1, MAX_RANK)
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
VARIANTS = (
    Scaling(),
    Scaling(sides="left"),
    Scaling(sides="right"),
    Scaling(residual=False),
    Scaling(sides="left", residual=False),
    Scaling(sides="right", residual=False),
    Scaling(lowrank=True),
)
variants = st.sampled_from(VARIANTS)


# ----------------------------------------------------------------------------------------------
# Helpers: randomisation and the test's own reference formulas (float64)
# ----------------------------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@torch.no_grad()
def randomise_(module: nn.Module, seed: int) -> None:
    """Overwrite every adapter parameter with N(0, 1) draws (non-zero almost surely)."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, _ in module.named_parameters()]
    assert names and all(n.startswith("rlrr_") for n in names), names
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype))


def randn(*shape: int, dtype: torch.dtype = F64, gen: torch.Generator | None = None) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def random_layernorm(shape: list[int], dtype: torch.dtype, gen: torch.Generator) -> nn.LayerNorm:
    """A LayerNorm with random γ and β (not its ones and zeros)."""
    norm = nn.LayerNorm(shape).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(*shape, dtype=dtype, gen=gen))
        norm.bias.copy_(randn(*shape, dtype=dtype, gen=gen))
    return norm


def close(actual: Tensor, expected: Tensor, tol: float, scale: float | Tensor) -> None:
    scale = float(scale.detach()) if isinstance(scale, Tensor) else float(scale)
    torch.testing.assert_close(actual.detach().to(F64), expected.detach().to(F64), rtol=tol, atol=tol * max(scale, 1e-30))


def ref_m(s_left: Tensor | None, s_right: Tensor | None, out: int, inn: int, chunks: int, absolute: bool = False) -> Tensor:
    """M[i, j] = Σ_r S_right[i, r] S_left[chunk(i), r, j] in float64 (App. F); a missing side is ones."""
    f = (lambda t: t.detach().to(F64).abs()) if absolute else (lambda t: t.detach().to(F64))
    chunk_of_row = torch.arange(out) // (out // chunks)  # (out,)
    if s_left is None:
        return f(s_right)[:, :1].expand(out, inn)
    left_rows = f(s_left)[chunk_of_row]  # (out, r, in)
    if s_right is None:
        return left_rows[:, 0, :]
    return torch.einsum("ir,irj->ij", f(s_right), left_rows)


def ref_rule(w: Tensor, m: Tensor, scaling: Scaling) -> Tensor:
    """Eq. 20 and its ablations, written in the (1 + M) ⊙ W form."""
    if scaling.lowrank:
        return w + m  # "w/o W" (Table 11)
    if scaling.residual:
        return (1 + m) * w  # Eq. 20
    return m * w  # no residual: s_left ⊙ W ⊙ s_right


def weight_bound(w: Tensor, m_abs: Tensor) -> Tensor:
    """An elementwise bound on every intermediate of the weight formula."""
    return w.to(F64).abs() * (1 + m_abs) + m_abs


def adapter_m(adapter: LinearRescale, out: int, inn: int, chunks: int, absolute: bool = False) -> Tensor:
    return ref_m(adapter.rlrr_s_left, adapter.rlrr_s_right, out, inn, chunks, absolute)


def kernel_index_map(shape: tuple[int, ...]) -> tuple[Tensor, Tensor, int, int]:
    """Where kernel element (o, i, k1..kn) sits in the (O·k1···k(n-1), I·kn) matrix, by index arithmetic."""
    out_channels, in_channels, *kernel = shape
    o, i, *ks = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    row = o
    for a, n in zip(ks[:-1], kernel[:-1]):
        row = row * n + a
    col = i * kernel[-1] + ks[-1]
    return row, col, out_channels * math.prod(kernel[:-1]), in_channels * kernel[-1]


def ref_flatten(w: Tensor) -> Tensor:
    row, col, rows, cols = kernel_index_map(tuple(w.shape))
    m = w.new_zeros(rows, cols)
    m[row, col] = w
    return m


def ref_unflatten(m: Tensor, shape: tuple[int, ...]) -> Tensor:
    row, col, _, _ = kernel_index_map(shape)
    return m[row, col]


def register(layer: nn.Module, adapter: nn.Module) -> None:
    parametrize.register_parametrization(layer, "weight", adapter)
    if getattr(layer, "bias", None) is not None:
        parametrize.register_parametrization(layer, "bias", BiasOf(adapter))


# ----------------------------------------------------------------------------------------------
# Strategies for layers
# ----------------------------------------------------------------------------------------------


@st.composite
def adapter_options(draw, rows: int) -> dict:
    scaling = draw(variants)
    rank = draw(ranks) if scaling.sides == "both" else 1
    return {"rank": rank, "chunks": draw(st.sampled_from(divisors(rows))), "scaling": scaling}


@dataclass(frozen=True)
class ConvCase:
    dim: int
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    padding_mode: str
    bias: bool
    sizes: tuple[int, ...]
    batch: int

    def build(self, dtype: torch.dtype) -> nn.Module:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.dim - 1]
        layer = cls(
            self.in_channels,
            self.out_channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
        )
        return layer.to(dtype)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)


@st.composite
def conv_cases(draw) -> ConvCase:
    dim = draw(st.integers(1, 3))
    if draw(st.booleans()):  # depthwise: groups = in_channels
        in_channels = draw(st.integers(1, 4))
        groups, out_channels = in_channels, in_channels * draw(st.integers(1, 2))
    else:
        groups = draw(st.integers(1, 3))
        in_channels, out_channels = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    kmax = 3 if dim < 3 else 2
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    # reflect needs padding < size, circular padding <= size; the kernel must fit the padded input
    sizes = tuple(max(p + 1, d * (k - 1) + 1) + draw(st.integers(0, 2)) for p, d, k in zip(padding, dilation, kernel))
    return ConvCase(dim, in_channels, out_channels, groups, kernel, stride, padding, dilation, padding_mode,
                    draw(st.booleans()), sizes, draw(st.integers(1, 2)))


@st.composite
def conv_cases_with_options(draw) -> tuple[ConvCase, dict]:
    case = draw(conv_cases())
    rows, _ = ConvRescale.matrix_shape(torch.Size(case.weight_shape))
    opts = draw(adapter_options(rows))
    opts["shift"] = draw(st.booleans())
    return case, opts


@st.composite
def linear_cases_with_options(draw) -> tuple[dict, dict]:
    out, inn = draw(dims), draw(dims)
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    opts = draw(adapter_options(out))
    opts["shift"] = draw(st.booleans())
    return {"out": out, "in": inn, "bias": draw(st.booleans()), "lead": lead}, opts


# ----------------------------------------------------------------------------------------------
# 1. Formulas against the paper
# ----------------------------------------------------------------------------------------------


@PROPS
@given(out=dims, inn=dims, dtype=dtypes, seed=seeds)
def test_rank1_weight_matches_eq19_elementwise(out: int, inn: int, dtype: torch.dtype, seed: int) -> None:
    """W'[i, j] = W[i, j] (1 + s_right[i] s_left[j]): Eq. 19 with the paper's (in, out) W transposed."""
    gen = torch.Generator().manual_seed(seed)
    w = randn(out, inn, dtype=dtype, gen=gen)
    adapter = LinearRescale(w, rank=1)
    randomise_(adapter, seed + 1)
    s_left = adapter.rlrr_s_left.to(F64)[0, 0].tolist()  # (in,)
    s_right = adapter.rlrr_s_right.to(F64)[:, 0].tolist()  # (out,)
    wl = w.to(F64).tolist()
    expected = torch.tensor([[wl[i][j] * (1 + s_right[i] * s_left[j]) for j in range(inn)] for i in range(out)], dtype=F64)
    scale = max(abs(wl[i][j]) * (1 + abs(s_right[i] * s_left[j])) for i in range(out) for j in range(inn))

    actual = adapter.effective_weight(w)
    assert actual.dtype == dtype and actual.shape == w.shape
    close(actual, expected, FORMULA_TOL[dtype], scale)
    close(adapter.effective_weight(w, dtype=F64), expected, FORMULA_TOL[F64], scale)  # the wide path
    assert adapter.effective_weight(w, dtype=F64).dtype == F64
    assert torch.equal(adapter(w), actual)  # forward is effective_weight


@PROPS
@given(out=dims, inn=dims, lead=st.integers(1, 4), seed=seeds)
def test_rank1_layer_output_matches_eq16_in_paper_layout(out: int, inn: int, lead: int, seed: int) -> None:
    """y = x (W + s_left ⊙ W ⊙ s_rightᵀ) + bᵀ + fᵀ with the paper's W of shape (in, out)."""
    torch.manual_seed(seed)
    layer = nn.Linear(inn, out).to(F64)
    w_paper, b = layer.weight.detach().T.clone(), layer.bias.detach().clone()  # (in, out), (out,)
    adapter = LinearRescale(layer.weight)
    register(layer, adapter)
    randomise_(adapter, seed + 1)
    s_left = adapter.rlrr_s_left.detach()[0, 0]  # (in,): the paper's column vector s_left
    s_right = adapter.rlrr_s_right.detach()[:, 0]  # (out,)
    f = adapter.rlrr_shift.detach()
    x = torch.randn(lead, inn, dtype=F64)
    expected = x @ (w_paper + s_left[:, None] * w_paper * s_right[None, :]) + b + f
    scale = (x.abs() @ (w_paper.abs() * (1 + (s_left[:, None] * s_right[None, :]).abs())) + b.abs() + f.abs()).max()
    close(layer(x), expected, FORMULA_TOL[F64], scale)


@PROPS
@given(out=dims, inn=dims, rank=ranks, dtype=dtypes, seed=seeds)
def test_rank_r_weight_matches_app_f(out: int, inn: int, rank: int, dtype: torch.dtype, seed: int) -> None:
    """W' = W + (S_right @ S_left) ⊙ W with S_right (out, r), S_left (r, in) (App. F)."""
    gen = torch.Generator().manual_seed(seed)
    w = randn(out, inn, dtype=dtype, gen=gen)
    adapter = LinearRescale(w, rank=rank)
    assert adapter.rlrr_s_left.shape == (1, rank, inn) and adapter.rlrr_s_right.shape == (out, rank)
    randomise_(adapter, seed + 1)
    s_right, s_left = adapter.rlrr_s_right.to(F64), adapter.rlrr_s_left.to(F64)[0]
    wd = w.to(F64)
    expected = wd + torch.einsum("ir,rj->ij", s_right, s_left) * wd
    m_abs = torch.einsum("ir,rj->ij", s_right.abs(), s_left.abs())
    close(adapter.effective_weight(w), expected, FORMULA_TOL[dtype], weight_bound(w, m_abs).max())


@PROPS
@given(per_chunk=st.integers(1, 4), chunks=st.integers(1, 3), inn=dims, rank=st.integers(1, 3), dtype=dtypes, seed=seeds)
def test_chunks_use_their_own_s_left(per_chunk: int, chunks: int, inn: int, rank: int, dtype: torch.dtype, seed: int) -> None:
    """Rows of output chunk k (i // (out / chunks) == k) are scaled with S_left[k]."""
    out = per_chunk * chunks
    gen = torch.Generator().manual_seed(seed)
    w = randn(out, inn, dtype=dtype, gen=gen)
    adapter = LinearRescale(w, rank=rank, chunks=chunks)
    assert adapter.rlrr_s_left.shape == (chunks, rank, inn)
    randomise_(adapter, seed + 1)
    s_left, s_right, wl = adapter.rlrr_s_left.to(F64).tolist(), adapter.rlrr_s_right.to(F64).tolist(), w.to(F64).tolist()
    expected = torch.empty(out, inn, dtype=F64)
    scale = 0.0
    for i in range(out):
        k = i // per_chunk
        for j in range(inn):
            m = sum(s_right[i][r] * s_left[k][r][j] for r in range(rank))
            m_abs = sum(abs(s_right[i][r] * s_left[k][r][j]) for r in range(rank))
            expected[i, j] = wl[i][j] * (1 + m)
            scale = max(scale, abs(wl[i][j]) * (1 + m_abs))
    close(adapter.effective_weight(w), expected, FORMULA_TOL[dtype], scale)


@PROPS
@given(out=dims, inn=dims, sides=st.sampled_from(["left", "right"]), residual=st.booleans(), chunks_pick=st.integers(0, 11),
       dtype=dtypes, seed=seeds)
def test_one_sided_scaling_matches_table6(out: int, inn: int, sides: str, residual: bool, chunks_pick: int,
                                          dtype: torch.dtype, seed: int) -> None:
    """Left only: W'[i, j] = W[i, j] (1 + s_left[j]); right only: W[i, j] (1 + s_right[i]); without residual drop the 1."""
    chunks = divisors(out)[chunks_pick % len(divisors(out))]
    gen = torch.Generator().manual_seed(seed)
    w = randn(out, inn, dtype=dtype, gen=gen)
    adapter = LinearRescale(w, chunks=chunks, scaling=Scaling(sides=sides, residual=residual))
    assert (adapter.rlrr_s_right is None) == (sides == "left") and (adapter.rlrr_s_left is None) == (sides == "right")
    randomise_(adapter, seed + 1)
    wl = w.to(F64).tolist()
    if sides == "left":
        s = adapter.rlrr_s_left.to(F64).tolist()  # (chunks, 1, in)
        factor = [[s[i // (out // chunks)][0][j] for j in range(inn)] for i in range(out)]
    else:
        s = adapter.rlrr_s_right.to(F64).tolist()  # (out, 1)
        factor = [[s[i][0] for _ in range(inn)] for i in range(out)]
    one = 1.0 if residual else 0.0
    expected = torch.tensor([[wl[i][j] * (one + factor[i][j]) for j in range(inn)] for i in range(out)], dtype=F64)
    scale = max(abs(wl[i][j]) * (1 + abs(factor[i][j])) for i in range(out) for j in range(inn))
    close(adapter.effective_weight(w), expected, FORMULA_TOL[dtype], scale)


@PROPS
@given(out=dims, inn=dims, rank=ranks, dtype=dtypes, seed=seeds)
def test_no_residual_is_s_left_w_s_right(out: int, inn: int, rank: int, dtype: torch.dtype, seed: int) -> None:
    """Without the residual term: W' = (S_right @ S_left) ⊙ W, i.e. s_left ⊙ W ⊙ s_right at rank 1."""
    gen = torch.Generator().manual_seed(seed)
    w = randn(out, inn, dtype=dtype, gen=gen)
    adapter = LinearRescale(w, rank=rank, scaling=Scaling(residual=False))
    randomise_(adapter, seed + 1)
    m = torch.einsum("ir,rj->ij", adapter.rlrr_s_right.to(F64), adapter.rlrr_s_left.to(F64)[0])
    m_abs = torch.einsum("ir,rj->ij", adapter.rlrr_s_right.to(F64).abs(), adapter.rlrr_s_left.to(F64)[0].abs())
    close(adapter.effective_weight(w), m * w.to(F64), FORMULA_TOL[dtype], weight_bound(w, m_abs).max())


@PROPS
@given(out=dims, inn=dims, rank=ranks, dtype=dtypes, seed=seeds)
def test_lowrank_is_w_plus_s_right_s_left(out: int, inn: int, rank: int, dtype: torch.dtype, seed: int) -> None:
    """"w/o W" (Table 11, App. F): W' = W + S_right @ S_left, no Hadamard product with W."""
    gen = torch.Generator().manual_seed(seed)
    w = randn(out, inn, dtype=dtype, gen=gen)
    adapter = LinearRescale(w, rank=rank, scaling=Scaling(lowrank=True))
    randomise_(adapter, seed + 1)
    s_right, s_left = adapter.rlrr_s_right.to(F64), adapter.rlrr_s_left.to(F64)[0]
    expected = torch.empty(out, inn, dtype=F64)
    for i in range(out):
        for j in range(inn):
            expected[i, j] = w[i, j].to(F64) + sum(s_right[i, r] * s_left[r, j] for r in range(rank))
    m_abs = s_right.abs() @ s_left.abs()
    close(adapter.effective_weight(w), expected, FORMULA_TOL[dtype], weight_bound(w, m_abs).max())


@PROPS
@given(out=dims, inn=dims, shift=st.booleans(), dtype=dtypes, seed=seeds)
def test_effective_bias_adds_the_shift(out: int, inn: int, shift: bool, dtype: torch.dtype, seed: int) -> None:
    """b' = b + f (Eq. 20); without a shift the bias is unchanged and rlrr_shift is None."""
    gen = torch.Generator().manual_seed(seed)
    w, b = randn(out, inn, dtype=dtype, gen=gen), randn(out, dtype=dtype, gen=gen)
    adapter = LinearRescale(w, shift=shift)
    randomise_(adapter, seed + 1)
    if not shift:
        assert adapter.rlrr_shift is None and not adapter.adapts_bias
        assert torch.equal(adapter.effective_bias(b), b)
        return
    assert adapter.rlrr_shift.shape == (out,) and adapter.adapts_bias
    f = adapter.rlrr_shift.to(F64)
    expected = torch.tensor([b[i].item() + f[i].item() for i in range(out)], dtype=F64)
    close(adapter.effective_bias(b), expected, FORMULA_TOL[dtype], (b.to(F64).abs() + f.abs()).max())
    close(adapter.effective_bias(b, dtype=F64), expected, FORMULA_TOL[F64], (b.to(F64).abs() + f.abs()).max())


@PROPS
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=2), dtype=dtypes, seed=seeds)
def test_norm_matches_ssf(shape: list[int], dtype: torch.dtype, seed: int) -> None:
    """γ' = γ ⊙ s, β' = β ⊙ s + t, and the layer computes s ⊙ LayerNorm(x) + t."""
    gen = torch.Generator().manual_seed(seed)
    norm = random_layernorm(shape, dtype, gen)
    gamma, beta = norm.weight.detach().clone(), norm.bias.detach().clone()
    adapter = NormScaleShift(norm.weight)
    randomise_(adapter, seed + 1)
    s, t = adapter.rlrr_scale.to(F64), adapter.rlrr_shift.to(F64)
    g64, b64 = gamma.to(F64), beta.to(F64)
    tol = FORMULA_TOL[dtype]
    close(adapter.effective_weight(gamma), g64 * s, tol, (g64 * s).abs().max())
    close(adapter.effective_bias(beta), b64 * s + t, tol, ((b64 * s).abs() + t.abs()).max())

    register(norm, adapter)
    x = randn(3, *shape, dtype=dtype, gen=gen)
    x_hat = F.layer_norm(x.to(F64), shape, eps=norm.eps)
    expected = s * (g64 * x_hat + b64) + t
    scale = (x_hat.abs() * (g64 * s).abs() + (b64 * s).abs() + t.abs()).max()
    close(norm(x), expected, FOLD_TOL[dtype], scale)


@PROPS
@given(rows=dims, inn=dims, scaling=variants, rank=ranks, chunks=st.integers(1, 3), weight_grad=st.booleans(), seed=seeds)
def test_written_out_derivatives_equal_autograd_of_the_formula(rows: int, inn: int, scaling: Scaling, rank: int, chunks: int,
                                                                weight_grad: bool, seed: int) -> None:
    """`scale_matrix_vjp` and `rescale_vjp` (the training path's backward) are the formulas' vector-Jacobian products."""
    rank = rank if scaling.sides == "both" else 1
    out = rows * chunks
    gen = torch.Generator().manual_seed(seed)
    w = randn(out, inn, gen=gen).requires_grad_(weight_grad)
    adapter = LinearRescale(w.detach(), rank=rank, chunks=chunks, scaling=scaling).to(F64)
    randomise_(adapter, seed)
    s_left, s_right = adapter.rlrr_s_left, adapter.rlrr_s_right
    dw = randn(out, inn, gen=gen)
    primals = [t for t in (s_left, s_right, w) if t is not None and t.requires_grad]
    expected = torch.autograd.grad(LinearRescale.weight_from(w, s_left, s_right, scaling), primals, dw)

    with torch.no_grad():
        value, m = LinearRescale.weight_and_m_from(w, s_left, s_right, scaling)
        dm, d_weight = rescale_vjp(dw.clone(), w, m, scaling, weight_grad=weight_grad)
        d_left, d_right = scale_matrix_vjp(dm, s_left, s_right)
    close(value, adapter.effective_weight(w), FORMULA_TOL[F64], w.abs().max())
    actual = [g for g, t in ((d_left, s_left), (d_right, s_right), (d_weight, w)) if t is not None and t.requires_grad]
    assert [g.shape for g in actual] == [g.shape for g in expected]
    for got, want in zip(actual, expected):
        close(got, want, FORMULA_TOL[F64], want.abs().max() + 1.0)
    assert (d_weight is None) == (not weight_grad)


# ----------------------------------------------------------------------------------------------
# 2. Convolutions by kernel flattening (App. G)
# ----------------------------------------------------------------------------------------------


@PROPS
@given(o=st.integers(1, 6), i=st.integers(1, 6), kh=st.integers(1, 4), kw=st.integers(1, 4), seed=seeds)
def test_flatten_kernel_2d_is_the_official_layout(o: int, i: int, kh: int, kw: int, seed: int) -> None:
    w = randn(o, i, kh, kw, dtype=torch.float32, gen=torch.Generator().manual_seed(seed))
    official = w.permute(0, 2, 1, 3).reshape(o * kh, i * kw)
    assert torch.equal(flatten_kernel(w), official)
    assert torch.equal(ref_flatten(w), official)  # the index map below agrees with the official code
    assert torch.equal(unflatten_kernel(official, w.shape), w)


@PROPS
@given(kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3), o=st.integers(1, 5), i=st.integers(1, 5), seed=seeds)
def test_flatten_unflatten_round_trip(kernel: list[int], o: int, i: int, seed: int) -> None:
    """(O, I, k1..kn) <-> (O·k1···k(n-1), I·kn) for Conv1d/2d/3d kernels, both directions."""
    gen = torch.Generator().manual_seed(seed)
    shape = (o, i, *kernel)
    w = randn(*shape, dtype=torch.float32, gen=gen)
    rows, cols = o * math.prod(kernel[:-1]), i * kernel[-1]
    flat = flatten_kernel(w)
    assert flat.shape == (rows, cols)
    assert ConvRescale.matrix_shape(w.shape) == (rows, cols)
    assert torch.equal(flat, ref_flatten(w))
    if len(kernel) == 1:
        assert torch.equal(flat, w.reshape(o, i * kernel[0]))  # Conv1d: a plain reshape
    assert torch.equal(unflatten_kernel(flat, w.shape), w)
    m = randn(rows, cols, dtype=torch.float32, gen=gen)
    assert torch.equal(unflatten_kernel(m, w.shape), ref_unflatten(m, shape))
    assert torch.equal(flatten_kernel(unflatten_kernel(m, w.shape)), m)


@PROPS
@given(kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3), o=st.integers(1, 4), i=st.integers(1, 4),
       data=st.data(), dtype=dtypes, seed=seeds)
def test_conv_effective_weight_is_the_flattened_linear_rule(kernel: list[int], o: int, i: int, data, dtype: torch.dtype,
                                                            seed: int) -> None:
    shape = (o, i, *kernel)
    rows, cols = o * math.prod(kernel[:-1]), i * kernel[-1]
    opts = data.draw(adapter_options(rows))
    w = randn(*shape, dtype=dtype, gen=torch.Generator().manual_seed(seed))
    adapter = ConvRescale(w, **opts)
    if adapter.rlrr_s_left is not None:
        assert adapter.rlrr_s_left.shape == (opts["chunks"], opts["rank"], cols)
    if adapter.rlrr_s_right is not None:
        assert adapter.rlrr_s_right.shape == (rows, opts["rank"])
    assert adapter.rlrr_shift.shape == (o,)
    randomise_(adapter, seed + 1)
    m = adapter_m(adapter, rows, cols, opts["chunks"])
    m_abs = adapter_m(adapter, rows, cols, opts["chunks"], absolute=True)
    wf = ref_flatten(w.to(F64))
    expected = ref_unflatten(ref_rule(wf, m, opts["scaling"]), shape)
    actual = adapter.effective_weight(w)
    assert actual.shape == w.shape and actual.dtype == dtype
    close(actual, expected, FORMULA_TOL[dtype], weight_bound(wf, m_abs).max())


@PROPS
@given(o=st.integers(1, 8), i=st.integers(1, 8), kh=st.integers(1, 4), kw=st.integers(1, 4), rank=ranks, shift=st.booleans())
def test_conv2d_parameter_count(o: int, i: int, kh: int, kw: int, rank: int, shift: bool) -> None:
    """r·(O·kh + I·kw) (+ O with a shift), as Table 12 counts; max rank min(O·kh, I·kw)."""
    w = torch.zeros(o, i, kh, kw)
    expected = rank * (o * kh + i * kw) + (o if shift else 0)
    adapter = ConvRescale(w, rank=rank, shift=shift)
    assert sum(p.numel() for p in adapter.parameters()) == expected
    assert ConvRescale.count_parameters(w.shape, rank=rank, chunks=1, scaling=Scaling(), shift=shift) == expected
    assert ConvRescale.max_rank(w.shape) == min(o * kh, i * kw)


@PROPS
@given(out=dims, inn=dims, data=st.data())
def test_linear_parameter_count_matches_the_built_adapter(out: int, inn: int, data) -> None:
    """r·(chunks·in + out) + out for both sides; one side drops its term; shift adds out."""
    opts = data.draw(adapter_options(out))
    shift = data.draw(st.booleans())
    adapter = LinearRescale(torch.zeros(out, inn), shift=shift, **opts)
    r, c, sides = opts["rank"], opts["chunks"], opts["scaling"].sides
    expected = (r * c * inn if sides != "right" else 0) + (r * out if sides != "left" else 0) + (out if shift else 0)
    assert sum(p.numel() for p in adapter.parameters()) == expected
    assert LinearRescale.count_parameters(torch.Size((out, inn)), shift=shift, **opts) == expected
    assert LinearRescale.max_rank(torch.Size((out, inn)), c) == min(out // c, inn)


# ----------------------------------------------------------------------------------------------
# 3. Fold exactness at layer level
# ----------------------------------------------------------------------------------------------


def linear_fold_case(case: dict, opts: dict, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor, float]:
    """(parametrized output, folded plain copy's output, error scale) for a randomised adapter."""
    torch.manual_seed(seed)
    layer = nn.Linear(case["in"], case["out"], bias=case["bias"]).to(dtype)
    plain = copy.deepcopy(layer)
    adapter = LinearRescale(layer.weight, **opts)
    register(layer, adapter)
    randomise_(adapter, seed + 1)
    x = torch.randn(*case["lead"], case["in"], dtype=F64).to(dtype)
    return _fold(layer, plain, adapter, x, case["out"], case["in"], opts["chunks"], flat=lambda w: w, unflat=lambda m, s: m)


def conv_fold_case(case: ConvCase, opts: dict, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor, float]:
    torch.manual_seed(seed)
    layer = case.build(dtype)
    plain = copy.deepcopy(layer)
    adapter = ConvRescale(layer.weight, **opts)
    register(layer, adapter)
    randomise_(adapter, seed + 1)
    x = torch.randn(case.batch, case.in_channels, *case.sizes, dtype=F64).to(dtype)
    rows, cols = ConvRescale.matrix_shape(torch.Size(case.weight_shape))
    return _fold(layer, plain, adapter, x, rows, cols, opts["chunks"], flat=ref_flatten, unflat=ref_unflatten)


@torch.no_grad()
def _fold(layer, plain, adapter, x, rows, cols, chunks, flat, unflat) -> tuple[Tensor, Tensor, float]:
    w = layer.parametrizations.weight.original
    plain.weight.copy_(adapter.effective_weight(w, dtype=F64).to(w.dtype))
    bias_bound = None
    if plain.bias is not None:
        b = layer.parametrizations.bias.original
        plain.bias.copy_(adapter.effective_bias(b, dtype=F64).to(b.dtype))
        shift = adapter.rlrr_shift
        bias_bound = b.to(F64).abs() + (shift.to(F64).abs() if shift is not None else 0)
    actual, expected = layer(x), plain(x)
    # the same layer on |x| with bounds on |W'| and |b'| bounds every partial sum of the output
    bound = copy.deepcopy(plain).to(F64)
    m_abs = adapter_m(adapter, rows, cols, chunks, absolute=True)
    bound.weight.copy_(unflat(weight_bound(flat(w.to(F64)), m_abs), tuple(w.shape)))
    if bias_bound is not None:
        bound.bias.copy_(bias_bound)
    return actual, expected, bound(x.to(F64).abs()).max().item()


def norm_fold_case(shape: list[int], lead: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor, float]:
    gen = torch.Generator().manual_seed(seed)
    norm = random_layernorm(shape, dtype, gen)
    plain = copy.deepcopy(norm)
    adapter = NormScaleShift(norm.weight)
    register(norm, adapter)
    randomise_(adapter, seed + 1)
    x = randn(*lead, *shape, dtype=dtype, gen=gen)
    with torch.no_grad():
        gamma, beta = norm.parametrizations.weight.original, norm.parametrizations.bias.original
        plain.weight.copy_(adapter.effective_weight(gamma, dtype=F64).to(dtype))
        plain.bias.copy_(adapter.effective_bias(beta, dtype=F64).to(dtype))
        s, t = adapter.rlrr_scale.to(F64).abs(), adapter.rlrr_shift.to(F64).abs()
        x_hat = F.layer_norm(x.to(F64), shape, eps=norm.eps).abs()
        scale = (x_hat * gamma.to(F64).abs() * s + beta.to(F64).abs() * s + t).max().item()
        return norm(x), plain(x), scale


@PROPS
@given(case_opts=linear_cases_with_options(), dtype=dtypes, seed=seeds)
def test_linear_fold_is_exact(case_opts, dtype: torch.dtype, seed: int) -> None:
    case, opts = case_opts
    actual, expected, scale = linear_fold_case(case, opts, dtype, seed)
    close(actual, expected, FOLD_TOL[dtype], scale)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_opts=conv_cases_with_options(), dtype=dtypes, seed=seeds)
def test_conv_fold_is_exact(case_opts, dtype: torch.dtype, seed: int) -> None:
    case, opts = case_opts
    actual, expected, scale = conv_fold_case(case, opts, dtype, seed)
    close(actual, expected, FOLD_TOL[dtype], scale)


@PROPS
@given(shape=st.lists(st.integers(1, 8), min_size=1, max_size=2), lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       dtype=dtypes, seed=seeds)
def test_layernorm_fold_is_exact(shape: list[int], lead: list[int], dtype: torch.dtype, seed: int) -> None:
    actual, expected, scale = norm_fold_case(shape, tuple(lead), dtype, seed)
    close(actual, expected, FOLD_TOL[dtype], scale)


@PROPS
@given(case_opts=conv_cases_with_options(), seed=seeds)
def test_fold_changes_the_output(case_opts, seed: int) -> None:
    """Guard against a vacuous fold test: the randomised adapter does change the conv's output."""
    case, opts = case_opts
    torch.manual_seed(seed)
    layer = case.build(F64)
    base = copy.deepcopy(layer)
    adapter = ConvRescale(layer.weight, **opts)
    register(layer, adapter)
    randomise_(adapter, seed + 1)
    x = torch.randn(case.batch, case.in_channels, *case.sizes, dtype=F64)
    with torch.no_grad():
        assert (layer(x) - base(x)).abs().max() > 1e-9


# In-place fold by row blocks (what export.fold runs): the same values as the whole fold, written
# block by block, and the finiteness check agrees with the whole tensor's.

rows_caps = st.one_of(st.none(), st.integers(1, 5))


def check_blocks(adapter, original: Tensor, is_bias: bool, rows: int | None) -> None:
    """The blocks cover every row once, in order, respect `rows` and never straddle a chunk."""
    blocks = adapter.row_blocks(original, is_bias, rows)
    assert [b[0] for b in blocks] == [0] + [b[1] for b in blocks[:-1]] and blocks[-1][1] == original.shape[0]
    if isinstance(adapter, LinearRescale) and not is_bias and len(blocks) > 1:
        per_row = adapter.out_features // original.shape[0]  # matrix rows per tensor row
        per_chunk = adapter.out_features // adapter.chunks  # matrix rows per chunk
        for start, stop in blocks:
            assert rows is None or stop - start <= rows
            assert start * per_row // per_chunk == (stop * per_row - 1) // per_chunk


def block_fold_matches(adapter, original: Tensor, rows: int | None) -> None:
    for is_bias, tensor in ((False, original), (True, torch.randn(original.shape[0], dtype=F64).to(original.dtype))):
        check_blocks(adapter, tensor, is_bias, rows)
        expected = adapter.folded(tensor, is_bias)
        target = tensor.clone()
        adapter.fold_into(target, is_bias, rows=rows)
        if rows is None and not is_bias:  # the whole matrix: the native loop where it applies (a multiply-add rounded once or twice)
            eps = torch.finfo(expected.dtype).eps
            torch.testing.assert_close(target, expected, rtol=2 * eps, atol=2 * eps * expected.abs().max().item())
        else:
            torch.testing.assert_close(target, expected, rtol=0, atol=0)  # the same ops on fewer rows
        assert adapter.fold_is_finite(tensor, is_bias, rows=rows)


@FEW
@given(case_opts=linear_cases_with_options(), rows=rows_caps, dtype=dtypes, seed=seeds)
def test_linear_fold_into_by_row_blocks_is_the_whole_fold(case_opts, rows: int | None, dtype: torch.dtype, seed: int) -> None:
    case, opts = case_opts
    torch.manual_seed(seed)
    weight = torch.randn(case["out"], case["in"], dtype=F64).to(dtype)
    adapter = LinearRescale(weight, **opts)
    randomise_(adapter, seed + 1)
    block_fold_matches(adapter, weight, rows)


@FEW
@given(case_opts=conv_cases_with_options(), rows=rows_caps, dtype=dtypes, seed=seeds)
def test_conv_fold_into_by_whole_output_channels_is_the_whole_fold(case_opts, rows: int | None, dtype: torch.dtype, seed: int) -> None:
    case, opts = case_opts
    torch.manual_seed(seed)
    weight = torch.randn(case.weight_shape, dtype=F64).to(dtype)
    adapter = ConvRescale(weight, **opts)
    randomise_(adapter, seed + 1)
    block_fold_matches(adapter, weight, rows)


@FEW
@given(shape=st.lists(st.integers(1, 8), min_size=1, max_size=2), rows=rows_caps, dtype=dtypes, seed=seeds)
def test_norm_fold_into_is_the_whole_fold(shape: list[int], rows: int | None, dtype: torch.dtype, seed: int) -> None:
    adapter = NormScaleShift(torch.ones(shape, dtype=dtype))
    randomise_(adapter, seed)
    gamma = torch.randn(shape, dtype=F64).to(dtype)
    target = gamma.clone()
    adapter.fold_into(target, False, rows=rows)
    torch.testing.assert_close(target, adapter.folded(gamma, False), rtol=0, atol=0)


@FEW
@given(case_opts=linear_cases_with_options(), rows=rows_caps, dtype=st.sampled_from((torch.float32, torch.bfloat16, torch.float16)),
       seed=seeds, poison=st.sampled_from(["nan_weight", "inf_scale", "huge_scale", "none"]), data=st.data())
def test_block_finiteness_check_agrees_with_the_whole_fold(case_opts, rows: int | None, dtype: torch.dtype, seed: int, poison: str, data) -> None:
    case, opts = case_opts
    torch.manual_seed(seed)
    weight = torch.randn(case["out"], case["in"], dtype=F64).to(dtype)
    adapter = LinearRescale(weight, **opts)
    randomise_(adapter, seed + 1)
    with torch.no_grad():
        if poison == "nan_weight":
            weight.view(-1)[data.draw(st.integers(0, weight.numel() - 1))] = float("nan")
        elif poison != "none":
            scale = adapter.rlrr_s_right if adapter.rlrr_s_right is not None else adapter.rlrr_s_left
            scale.view(-1)[data.draw(st.integers(0, scale.numel() - 1))] = float("inf") if poison == "inf_scale" else 1e36
    whole = adapter.folded(weight, False)
    assert adapter.fold_is_finite(weight, False, rows=rows) == bool(torch.isfinite(whole).all())
    if poison in ("nan_weight", "inf_scale"):
        assert not adapter.fold_is_finite(weight, False, rows=rows)


# ----------------------------------------------------------------------------------------------
# 4. Identity init
# ----------------------------------------------------------------------------------------------

residual_variants = st.sampled_from([v for v in VARIANTS if v.residual or v.lowrank])
no_residual_variants = st.sampled_from([v for v in VARIANTS if not v.residual and not v.lowrank])


@PROPS
@given(case_opts=linear_cases_with_options(), scaling=residual_variants, dtype=dtypes, seed=seeds)
def test_identity_init_linear_output_is_exactly_the_base(case_opts, scaling: Scaling, dtype: torch.dtype, seed: int) -> None:
    case, opts = case_opts
    opts = {**opts, "scaling": scaling, "rank": opts["rank"] if scaling.sides == "both" else 1}
    torch.manual_seed(seed)
    layer = nn.Linear(case["in"], case["out"], bias=case["bias"]).to(dtype)
    base = copy.deepcopy(layer)
    adapter = LinearRescale(layer.weight, init="identity", **opts)
    sides = [p for p in (adapter.rlrr_s_left, adapter.rlrr_s_right) if p is not None]
    assert sum(bool((p == 0).all()) for p in sides) == 1  # exactly one side is zero ...
    if len(sides) == 2:
        assert bool((adapter.rlrr_s_left != 0).any())  # ... and the other is not, so gradients flow
    register(layer, adapter)
    x = torch.randn(*case["lead"], case["in"], dtype=F64).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer.weight, base.weight)
        if case["bias"]:
            assert torch.equal(layer.bias, base.bias)
        assert torch.equal(layer(x), base(x))


@PROPS
@given(case_opts=conv_cases_with_options(), scaling=residual_variants, dtype=dtypes, seed=seeds)
def test_identity_init_conv_output_is_exactly_the_base(case_opts, scaling: Scaling, dtype: torch.dtype, seed: int) -> None:
    case, opts = case_opts
    opts = {**opts, "scaling": scaling, "rank": opts["rank"] if scaling.sides == "both" else 1}
    torch.manual_seed(seed)
    layer = case.build(dtype)
    base = copy.deepcopy(layer)
    register(layer, ConvRescale(layer.weight, init="identity", **opts))
    x = torch.randn(case.batch, case.in_channels, *case.sizes, dtype=F64).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer.weight, base.weight)
        assert torch.equal(layer(x), base(x))


@PROPS
@given(shape=st.lists(st.integers(1, 8), min_size=1, max_size=2), dtype=dtypes, seed=seeds)
def test_identity_init_norm_output_is_exactly_the_base(shape: list[int], dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    norm = random_layernorm(shape, dtype, gen)
    base = copy.deepcopy(norm)
    adapter = NormScaleShift(norm.weight, init="identity")
    assert bool((adapter.rlrr_scale == 1).all()) and bool((adapter.rlrr_shift == 0).all())
    register(norm, adapter)
    x = randn(2, *shape, dtype=dtype, gen=gen)
    with torch.no_grad():
        assert torch.equal(norm(x), base(x))


@PROPS
@given(out=dims, inn=dims, scaling=no_residual_variants, rank=ranks, init=st.sampled_from(["paper", "identity"]),
       conv=st.booleans(), dtype=dtypes, seed=seeds)
def test_no_residual_init_is_m_equal_one(out: int, inn: int, scaling: Scaling, rank: int, init: str, conv: bool,
                                        dtype: torch.dtype, seed: int) -> None:
    """Without the residual term both inits start at M = 1, so W' == W up to rounding (exactly at rank 1)."""
    rank = rank if scaling.sides == "both" else 1
    w = randn(out, inn, 2, dtype=dtype, gen=torch.Generator().manual_seed(seed)) if conv else \
        randn(out, inn, dtype=dtype, gen=torch.Generator().manual_seed(seed))
    cls = ConvRescale if conv else LinearRescale
    adapter = cls(w, rank=rank, scaling=scaling, init=init)
    rows, cols = cls.matrix_shape(w.shape)
    m = adapter_m(adapter, rows, cols, 1)
    close(m, torch.ones_like(m), FORMULA_TOL[dtype], 1.0)
    actual = adapter.effective_weight(w)
    if rank == 1:
        assert torch.equal(actual, w)
    else:
        close(actual, w, FORMULA_TOL[dtype], w.to(F64).abs().max())


# ----------------------------------------------------------------------------------------------
# 5. The paper's init
# ----------------------------------------------------------------------------------------------


def check_uniform(values: Tensor, bound: float) -> None:
    """Inside [-bound, bound], reaching near both ends, with the uniform variance bound²/3 (±20 %)."""
    v = values.detach().to(F64).flatten()
    assert v.abs().max() <= bound * (1 + 1e-6), (v.abs().max().item(), bound)
    assert v.max() > 0.9 * bound and v.min() < -0.9 * bound
    assert abs(v.var().item() / (bound**2 / 3) - 1) < 0.2


def test_paper_init_is_kaiming_uniform_as_the_official_code() -> None:
    """s_left (chunks, r, in) within sqrt(6 / in) per chunk; s_right (out, r) within sqrt(6 / r); f = 0."""
    torch.manual_seed(0)
    out, inn, rank, chunks = 3 * 200, 300, 3, 3
    adapter = LinearRescale(torch.randn(out, inn), rank=rank, chunks=chunks)
    for chunk in adapter.rlrr_s_left:
        check_uniform(chunk, math.sqrt(6 / inn))
    assert not torch.equal(adapter.rlrr_s_left[0], adapter.rlrr_s_left[1])  # chunks drawn separately
    check_uniform(adapter.rlrr_s_right, math.sqrt(6 / rank))
    assert torch.equal(adapter.rlrr_shift, torch.zeros(out))
    # rank 1 is the official (1, in) / (out, 1) pair: fan-in in and 1
    adapter = LinearRescale(torch.randn(out, inn))
    check_uniform(adapter.rlrr_s_left, math.sqrt(6 / inn))
    check_uniform(adapter.rlrr_s_right, math.sqrt(6))
    # a conv's fan-in is that of its flattened matrix: I·kw
    adapter = ConvRescale(torch.randn(64, 50, 3, 4), rank=2)
    check_uniform(adapter.rlrr_s_left, math.sqrt(6 / (50 * 4)))
    check_uniform(adapter.rlrr_s_right, math.sqrt(6 / 2))


@PROPS
@given(out=dims, inn=dims, rank=ranks, seed=seeds, conv=st.booleans())
def test_paper_init_bounds_hold_for_every_shape(out: int, inn: int, rank: int, seed: int, conv: bool) -> None:
    torch.manual_seed(seed)
    w = torch.randn(out, inn, 3) if conv else torch.randn(out, inn)
    cls = ConvRescale if conv else LinearRescale
    adapter = cls(w, rank=rank)
    rows, cols = cls.matrix_shape(w.shape)
    assert adapter.rlrr_s_left.abs().max() <= math.sqrt(6 / cols) * (1 + 1e-6)
    assert adapter.rlrr_s_right.abs().max() <= math.sqrt(6 / rank) * (1 + 1e-6)
    assert bool((adapter.rlrr_s_left != 0).any()) and bool((adapter.rlrr_s_right != 0).any())
    assert torch.equal(adapter.rlrr_shift, torch.zeros(out))


def test_paper_init_norm_is_n_1_0_02() -> None:
    torch.manual_seed(0)
    n = 4096
    adapter = NormScaleShift(torch.ones(n))
    s, t = adapter.rlrr_scale.detach().to(F64), adapter.rlrr_shift.detach().to(F64)
    assert abs(s.mean().item() - 1) < 5 * 0.02 / math.sqrt(n)
    assert abs(t.mean().item()) < 5 * 0.02 / math.sqrt(n)
    assert 0.018 < s.std().item() < 0.022 and 0.018 < t.std().item() < 0.022
    assert (s - 1).abs().max() < 0.02 * 6


@FEW
@given(case_opts=conv_cases_with_options(), out=dims, inn=dims, shape=st.lists(st.integers(2, 8), min_size=1, max_size=2),
       seed=seeds)
def test_paper_init_is_not_the_identity(case_opts, out: int, inn: int, shape: list[int], seed: int) -> None:
    """Table 10's init moves the model at step 0 (residual variants): the output differs from the base's."""
    torch.manual_seed(seed)
    case, _ = case_opts
    conv = case.build(F64)
    layers = [(nn.Linear(inn, out).to(F64), LinearRescale, torch.randn(2, inn, dtype=F64)),
              (conv, ConvRescale, torch.randn(case.batch, case.in_channels, *case.sizes, dtype=F64)),
              (nn.LayerNorm(shape).to(F64), NormScaleShift, torch.randn(2, *shape, dtype=F64))]
    for layer, cls, x in layers:
        base = copy.deepcopy(layer)
        register(layer, cls(layer.weight))
        with torch.no_grad():
            assert (layer(x) - base(x)).abs().max() > 1e-9, cls.__name__


# ----------------------------------------------------------------------------------------------
# 6. Gradients
# ----------------------------------------------------------------------------------------------


def _train_step_checks(layer: nn.Module, adapter: nn.Module, x: Tensor, gen: torch.Generator) -> None:
    base = copy.deepcopy(layer)
    register(layer, adapter)
    y = layer(x)
    (y * torch.randn(y.shape, generator=gen, dtype=F64).to(y.dtype)).sum().backward()
    named = dict(layer.named_parameters())
    adapters = dict(adapter_parameters(layer))
    assert set(adapters) == {n for n in named if n.rsplit(".", 1)[-1].startswith("rlrr_")}
    assert len(adapters) == len(list(adapter.parameters()))  # BiasOf owns none: no duplicates
    for name, p in named.items():
        if name in adapters:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    before = {n: p.detach().clone() for n, p in named.items()}
    torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1).step()
    for name, p in named.items():
        assert torch.equal(p, before[name]) != (name in adapters), name  # only adapters move
    with torch.no_grad():
        assert torch.equal(layer.parametrizations.weight.original, base.weight)


@FEW
@given(case_opts=linear_cases_with_options(), seed=seeds)
def test_only_adapter_parameters_get_gradients_linear(case_opts, seed: int) -> None:
    case, opts = case_opts
    opts = {**opts, "scaling": Scaling(), "shift": case["bias"]}
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(case["in"], case["out"], bias=case["bias"]).to(F64).requires_grad_(False)
    _train_step_checks(layer, LinearRescale(layer.weight, **opts), torch.randn(*case["lead"], case["in"], generator=gen, dtype=F64), gen)


@FEW
@given(case_opts=conv_cases_with_options(), seed=seeds)
def test_only_adapter_parameters_get_gradients_conv(case_opts, seed: int) -> None:
    case, opts = case_opts
    opts = {**opts, "scaling": Scaling(), "shift": case.bias}
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = case.build(F64).requires_grad_(False)
    x = torch.randn(case.batch, case.in_channels, *case.sizes, generator=gen, dtype=F64)
    _train_step_checks(layer, ConvRescale(layer.weight, **opts), x, gen)


@FEW
@given(shape=st.lists(st.integers(1, 8), min_size=1, max_size=2), seed=seeds)
def test_only_adapter_parameters_get_gradients_norm(shape: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = [*shape[:-1], shape[-1] + 1]  # a single normalised element has x̂ = 0 and no signal
    norm = nn.LayerNorm(shape).to(F64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape, generator=gen, dtype=F64))
        norm.bias.copy_(torch.randn(shape, generator=gen, dtype=F64))
    norm.requires_grad_(False)
    _train_step_checks(norm, NormScaleShift(norm.weight), torch.randn(2, *shape, generator=gen, dtype=F64), gen)


@PROPS
@given(out=dims, inn=dims, seed=seeds)
def test_rank1_gradients_match_the_hand_derivative(out: int, inn: int, seed: int) -> None:
    """For L = Σ G ⊙ W' + Σ g ⊙ b': dL/ds_left[j] = Σ_i G W s_right[i], dL/ds_right[i] = Σ_j G W s_left[j], dL/df = g."""
    gen = torch.Generator().manual_seed(seed)
    w, b = torch.randn(out, inn, generator=gen, dtype=F64), torch.randn(out, generator=gen, dtype=F64)
    g_w, g_b = torch.randn(out, inn, generator=gen, dtype=F64), torch.randn(out, generator=gen, dtype=F64)
    adapter = LinearRescale(w)
    randomise_(adapter, seed + 1)
    ((adapter(w) * g_w).sum() + (adapter.effective_bias(b) * g_b).sum()).backward()
    s_left, s_right = adapter.rlrr_s_left.detach()[0, 0], adapter.rlrr_s_right.detach()[:, 0]
    tol = FORMULA_TOL[F64]
    scale = (g_w.abs() * w.abs()).sum() * (s_left.abs().max() + s_right.abs().max())
    close(adapter.rlrr_s_left.grad[0, 0], (g_w * w * s_right[:, None]).sum(0), tol, scale)
    close(adapter.rlrr_s_right.grad[:, 0], (g_w * w * s_left[None, :]).sum(1), tol, scale)
    close(adapter.rlrr_shift.grad, g_b, tol, 1.0)


def test_deepcopy_keeps_the_bias_bound_to_the_copied_adapter() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(F64)
    adapter = LinearRescale(layer.weight)
    register(layer, adapter)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.parametrizations.weight[0].rlrr_shift.fill_(5.0)
        assert torch.equal(layer.bias, layer.parametrizations.bias.original)  # the original is unaffected
        assert torch.equal(twin.bias, twin.parametrizations.bias.original + 5.0)


# ----------------------------------------------------------------------------------------------
# 7. Bad construction
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LinearRescale(torch.zeros(4, 3), rank=0), "rank"),
        (lambda: LinearRescale(torch.zeros(4, 3), rank=-1), "rank"),
        (lambda: ConvRescale(torch.zeros(4, 3, 2, 2), rank=0), "rank"),
        (lambda: LinearRescale(torch.zeros(4, 3), chunks=3), "chunks"),
        (lambda: LinearRescale(torch.zeros(4, 3), chunks=0), "chunks"),
        (lambda: ConvRescale(torch.zeros(3, 3, 1, 2), chunks=2), "chunks"),  # rows O·kh = 3
        (lambda: LinearRescale(torch.zeros(4, 3), rank=2, scaling=Scaling(sides="left")), "rank must be 1"),
        (lambda: LinearRescale(torch.zeros(4, 3), rank=2, scaling=Scaling(sides="right")), "rank must be 1"),
        (lambda: LinearRescale(torch.zeros(4, 3), scaling=Scaling(sides="top")), "scaling must be"),
        (lambda: LinearRescale(torch.zeros(4, 3), init="zeros"), "init"),
        (lambda: ConvRescale(torch.zeros(4, 3, 2, 2), init="kaiming"), "init"),
        (lambda: NormScaleShift(torch.ones(4), init="ones"), "init"),
    ],
)
def test_bad_construction_raises_value_error(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_conv_chunks_dividing_rows_but_not_channels_are_accepted() -> None:
    """Chunks split the flattened rows (O·kh), so O·kh = 6 takes chunks = 2 even with O = 3."""
    adapter = ConvRescale(torch.zeros(3, 2, 2, 2), chunks=2)
    assert adapter.rlrr_s_left.shape == (2, 1, 4)
