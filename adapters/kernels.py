"""How the recompute training path (adapters/recompute.py) evaluates W' and its gradients.

Both ways evaluate the one formula, `LinearRescale.weight_from` (`scale_matrix` and `rescale`);
they differ in how many times they touch weight-sized memory. Counting every read or write of an
(out, in) tensor as one pass, dW' = dYᵀX written by its GEMM included, one training step makes

- `EAGER`, op by op: forward `bmm` writes M, `addcmul` reads M and W and writes W' (4); backward
  the same again (4), the GEMM writes dW' (1), autograd forms dM = dW' ⊙ W (3) and reads dM once
  for each scale's gradient (2): 14 passes, 7 parallel ops of weight size.
- `compiled()`, the same `weight_from` (with `fused=True`) through `torch.compile`: forward is one
  loop that reads W and writes W' (2); backward, after the GEMM writes dW' (1), is one kernel whose
  three loops read dW' and W for S_left's gradient (2), again for S_right's (2), and read W to write
  W' for dX (2): 9 passes, 2 kernels. M and dM never reach memory. 7 is the least without touching
  the GEMMs (both reductions and W' in one loop); below that the rescale must live inside the GEMM.

On CPU, W' and dW' go into per-thread buffers that are reused from layer to layer and step to step:
a fresh tensor of a few MiB is fresh pages from the kernel (glibc returns freed large blocks), and
the page faults cost as much as a pass (about 6 µs a 4 KiB page, measured here). CUDA's caching
allocator already reuses memory, so there every call allocates.

Compiling happens lazily, at the first training step of each (dtype, scaling, chunking) variant:
seconds to a minute with a C++ compiler on CPU, Triton on CUDA. If it fails the kernels warn once
and evaluate eagerly from then on, so training never depends on a working compiler.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adapters.linear import LinearRescale, rescale_vjp, scale_matrix_vjp


class _Buffers(threading.local):
    """Reusable CPU buffers, one per (slot, dtype) and thread: a slot's tensor lives only inside one call."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, torch.dtype], Tensor] = {}
        self.views: dict[tuple, Tensor] = {}  # (slot, dtype, shape) -> a view of the slot's tensor: no view op per call

    def get(self, slot: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A tensor of `shape` on `like`'s device, in `dtype` (else `like`'s), valid until the slot's next use."""
        dtype = dtype or like.dtype
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=like.device)
        view_key = (slot, dtype, tuple(shape))
        view = self.views.get(view_key)
        if view is not None:
            return view
        numel = 1
        for n in shape:
            numel *= n
        key = (slot, dtype)
        flat = self.store.get(key)
        if flat is None or flat.numel() < numel:
            flat = self.store[key] = torch.empty(numel, dtype=dtype)
            self.views = {k: v for k, v in self.views.items() if k[:2] != key}  # views of the old tensor
        view = self.views[view_key] = flat[:numel].view(shape)
        return view


BUFFERS = _Buffers()


def weight_gradient(dy: Tensor, x: Tensor, reuse: bool) -> Tensor:
    """dW' = dYᵀX over all tokens, (out, in); into a reused buffer when nothing keeps it past the call."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # (tokens, out), (tokens, in)
    if not reuse:
        return dy2.t() @ x2
    return torch.mm(dy2.t(), x2, out=BUFFERS.get("dw", (dy2.shape[1], x2.shape[1]), dy2))


class EagerKernels:
    """The formula op by op into reused buffers; its gradients from the written-out derivatives: 14 passes a step."""

    name = "eager"

    def weight(self, adapter: LinearRescale, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """W' for a forward without a graph, computed in W's dtype, handed out in `dtype` (autocast's)."""
        return _cast(_weight_and_m(adapter, weight, *_scales(adapter))[0], dtype)

    def weight_and_grads(self, adapter: LinearRescale, weight: Tensor, dw: Tensor, wanted: Sequence[Tensor],
                         create: bool, dtype: torch.dtype | None = None) -> tuple[Tensor, list[Tensor | None]]:
        """W' (for dX, in `dtype`) and the gradients of `wanted` (the adapter's scales, W) given dW'.

        `create`: keep both differentiable (backward with create_graph=True): then autograd
        differentiates the formula itself. Otherwise dW' is overwritten (it is dM afterwards).
        """
        if create:
            return _autograd_weight_and_grads(adapter, weight, dw, wanted, dtype)
        s_left, s_right = _scales(adapter)
        w, m = _weight_and_m(adapter, weight, s_left, s_right)
        with_weight = any(t is weight for t in wanted)
        dm, d_weight = rescale_vjp(dw.to(w.dtype), weight, m, adapter.scaling, weight_grad=with_weight)
        d_left, d_right = scale_matrix_vjp(dm, s_left, s_right)
        found = {id(adapter.rlrr_s_left): d_left, id(adapter.rlrr_s_right): d_right, id(weight): d_weight}
        return _cast(w, dtype), [found.get(id(t)) for t in wanted]


def _weight_and_m(adapter: LinearRescale, weight: Tensor, s_left: Tensor | None, s_right: Tensor | None) -> tuple[Tensor, Tensor]:
    """(W', M) from the adapter's scales, in W's dtype, in this thread's buffers on CPU (valid until the next call)."""
    m_out = BUFFERS.get("m", weight.shape, weight) if s_left is not None and s_right is not None else None
    return type(adapter).weight_and_m_from(weight, s_left, s_right, adapter.scaling, out=BUFFERS.get("w", weight.shape, weight), m_out=m_out)


def _autograd_weight_and_grads(adapter: LinearRescale, weight: Tensor, dw: Tensor, wanted: Sequence[Tensor],
                               dtype: torch.dtype | None) -> tuple[Tensor, list[Tensor | None]]:
    """W' and the gradients by autograd of the formula, every step differentiable (double backward)."""
    with torch.enable_grad():  # the formula again, with its own small graph
        w = adapter.effective_weight(weight)
    grads = torch.autograd.grad(w, list(wanted), dw.to(w.dtype), allow_unused=True, create_graph=True) if wanted else []
    return _cast(w, dtype), list(grads)


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t if dtype is None or dtype == t.dtype else t.to(dtype)


EAGER = EagerKernels()


def _weight(cls: type[LinearRescale], scaling, weight: Tensor, s_left: Tensor | None, s_right: Tensor | None, out: Tensor) -> None:
    out.copy_(cls.weight_from(weight, s_left, s_right, scaling, fused=True))


def _weight_and_grads(cls: type[LinearRescale], scaling, weight: Tensor, s_left: Tensor | None, s_right: Tensor | None,
                      dw: Tensor, with_weight: bool, out: Tensor) -> tuple[Tensor, ...]:
    """W' into `out`, and the vector-Jacobian product with dW' for the scales present (and W)."""
    primals = [t for t in (s_left, s_right) if t is not None] + ([weight] if with_weight else [])

    def formula(*values: Tensor) -> Tensor:
        it = iter(values)
        left = next(it) if s_left is not None else None
        right = next(it) if s_right is not None else None
        return cls.weight_from(next(it) if with_weight else weight, left, right, scaling, fused=True)

    value, pull = torch.func.vjp(formula, *primals)
    out.copy_(value)  # (a cast too, under autocast: one loop)
    return pull(dw.to(value.dtype))


class CompiledKernels:
    """`weight_from` compiled by torch.compile into fused loops: 9 passes a step (see the module doc)."""

    def __init__(self, backend: str | Callable = "inductor") -> None:
        self.name = f"compiled ({getattr(backend, '__name__', backend)})"
        self.backend = backend
        options = {"dynamic": True, "fullgraph": True, "backend": backend}
        self._weight = torch.compile(_weight, **options)
        self._weight_and_grads = torch.compile(_weight_and_grads, **options)
        self.failed: str | None = None

    def _fall_back(self, e: Exception) -> None:
        self.failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"rlrr: the {self.name} training kernels failed, using eager ones from now on: {self.failed}", stacklevel=4)

    def weight(self, adapter: LinearRescale, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        if self.failed is None:
            out = BUFFERS.get("w", weight.shape, weight, dtype)
            try:
                self._weight(type(adapter), adapter.scaling, weight.detach(), *_scales(adapter), out)
                return out
            except Exception as e:  # reason: a missing C++ compiler or Triton must not stop training
                self._fall_back(e)
        return EAGER.weight(adapter, weight, dtype)

    def weight_and_grads(self, adapter: LinearRescale, weight: Tensor, dw: Tensor, wanted: Sequence[Tensor],
                         create: bool, dtype: torch.dtype | None = None) -> tuple[Tensor, list[Tensor | None]]:
        if self.failed is None and not create:
            s_left, s_right = _scales(adapter)
            with_weight = any(t is weight for t in wanted)
            out = BUFFERS.get("w", weight.shape, weight, dtype)
            try:
                found = self._weight_and_grads(type(adapter), adapter.scaling, weight.detach(), s_left, s_right, dw, with_weight, out)
            except Exception as e:  # reason: as in `weight`
                self._fall_back(e)
            else:
                it = iter(found)
                by_source = {id(p): next(it) for p in (adapter.rlrr_s_left, adapter.rlrr_s_right) if p is not None}
                if with_weight:
                    by_source[id(weight)] = next(it)
                return out, [by_source.get(id(t)) for t in wanted]
        return EAGER.weight_and_grads(adapter, weight, dw, wanted, create, dtype)

    def __deepcopy__(self, memo: dict) -> "CompiledKernels":  # shared, like the compiled code it holds
        return self


def _scales(adapter: LinearRescale) -> tuple[Tensor | None, Tensor | None]:
    """The scales as plain tensors sharing storage: a compiler then treats their shapes as dynamic."""
    return tuple(None if p is None else p.detach() for p in (adapter.rlrr_s_left, adapter.rlrr_s_right))


_COMPILED: dict[str, CompiledKernels] = {}


def compiled(backend: str = "inductor") -> CompiledKernels:
    """The process's compiled kernels for `backend` (one set, so each variant compiles once)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = CompiledKernels(backend)
    return _COMPILED[backend]


__all__ = ["EAGER", "CompiledKernels", "EagerKernels", "compiled", "weight_gradient"]
