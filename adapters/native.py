"""The recompute path's paper form as one hand-written CPU loop per direction: 6 passes a step.

For W' = W + (S_right @ S_left) ⊙ W (both sides, residual: Eq. 16 at any rank and chunking), in
float32 or float64 on CPU, each row of W is read once per direction:

- forward: one loop reads W and writes W' (2 passes; M is never stored);
- backward, after the GEMM writes dW' (1): one loop reads W and dW' and writes W' for dX while
  summing both scale gradients, S_right's along the row and S_left's down the columns in a small
  per-thread array (3 passes; dM is never stored);
- fold (Eq. 20): the forward loop writes W' over W in place (2 passes, against 4 op by op).

The op-by-op path (`EagerKernels`) makes 14 passes in 7 ops; `torch.compile` will not put a row
and a column reduction into one loop (9). The loop is the same arithmetic as `scale_matrix` and
`rescale` and their derivatives (adapters/linear.py), checked against them in tests; anything
else (another scaling, dtype or device, a trainable W, a differentiable backward) goes to
`EagerKernels`.

The source, native_loops.cpp, is plain C++ with OpenMP and no PyTorch headers: `torch.utils.cpp_extension.load`
builds it at the first training step (or fold) in about a second (ninja, a C++ compiler) into its
own folder of PyTorch's extension cache (`build_directory`), under its file lock (DDP processes build
it once); later processes load the finished library straight from there. It is loaded with ctypes and
called with the tensors' data pointers; OpenMP is the runtime PyTorch already loaded, so
`torch.set_num_threads` applies. If the build fails, a warning says why and the op-by-op path
runs from then on.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from adapters.base import Scaling
from adapters.kernels import BUFFERS, EagerKernels, _cast, _scales
from adapters.linear import LinearRescale

#: The loops, a plain C++ file beside this one (package data).
SOURCE = Path(__file__).with_name("native_loops.cpp")

#: The extension's name (its build folder's, with a digest of the source: a changed source rebuilds it).
NAME = "rlrr_native_kernels"
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_PAPER = Scaling()


_FLAGS = {"extra_cflags": ("-O3", "-fopenmp"), "extra_ldflags": ("-fopenmp",)}


def build_directory() -> Path:
    """This source's own build folder in PyTorch's extension cache (TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions), named by a digest of the source, flags and torch version: a folder
    never holds another source's build, so a finished one can be loaded without a rebuild check."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    digest = hashlib.sha256(SOURCE.read_bytes() + repr((_FLAGS, torch.__version__)).encode()).hexdigest()[:16]
    return Path(root) / f"{NAME}-{digest}"


def _quiet_import_load():
    """torch.utils.cpp_extension.load, imported only when the loop is first built, without the
    warning its import logs on a CUDA build of torch with no CUDA runtime (this build is CPU-only)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        log.setLevel(level)
    return load


def build(verbose: bool = False) -> ctypes.CDLL:
    """Load SOURCE's library from its build folder, compiling it there first (torch.utils.cpp_extension) if needed.

    A finished build leaves a `ready` file naming its library; with it, loading skips
    cpp_extension (its import and ninja's check cost ~0.1 s, and a full garbage collection in a
    process holding a big model).
    """
    folder = build_directory()
    ready = folder / "ready"
    path = folder / Path(ready.read_text().strip()).name if ready.is_file() else None
    if path is None or not path.is_file():
        load = _quiet_import_load()
        folder.mkdir(parents=True, exist_ok=True)
        path = Path(load(NAME, [str(SOURCE)], build_directory=str(folder), is_python_module=False, verbose=verbose,
                         **{key: list(flags) for key, flags in _FLAGS.items()}))  # (lists: load extends them)
        staged = folder / f"ready.{os.getpid()}"
        staged.write_text(path.name)
        os.replace(staged, ready)  # atomic: another process sees no file or a whole one
    library = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for suffix in _SUFFIX.values():
        getattr(library, f"rlrr_weight_{suffix}").argtypes = [pointer] * 4 + [size] * 4
        getattr(library, f"rlrr_weight_and_grads_{suffix}").argtypes = [pointer] * 7 + [size] * 4
    return library


class NativeKernels(EagerKernels):
    """The paper form through the hand-written loops (see the module doc); everything else op by op."""

    name = "native"

    def __init__(self) -> None:
        self._library: ctypes.CDLL | None = None
        self._lock = threading.Lock()
        self.failed: str | None = None

    def library(self) -> ctypes.CDLL | None:
        """The loaded loops, built at the first call; None (after one warning) if that failed."""
        if self._library is None and self.failed is None:
            with self._lock:
                if self._library is None and self.failed is None:
                    try:
                        self._library = build()
                    except Exception as e:  # reason: no compiler or ninja must not stop training
                        self.failed = f"{type(e).__name__}: {str(e)[-400:]}"  # (the end of a build log)
                        warnings.warn(f"rlrr: could not build the native training loop, using op-by-op kernels: {self.failed}", stacklevel=5)
        return self._library

    def _takes(self, adapter: LinearRescale, weight: Tensor) -> ctypes.CDLL | None:
        if type(adapter) is not LinearRescale or adapter.scaling != _PAPER or weight.device.type != "cpu" or weight.dtype not in _SUFFIX:
            return None
        if weight.dim() != 2 or not weight.is_contiguous() or adapter.rlrr_s_left.dtype != weight.dtype or adapter.rlrr_s_right.dtype != weight.dtype:
            return None
        return self.library()

    def weight(self, adapter: LinearRescale, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        library = self._takes(adapter, weight)
        if library is None:
            return super().weight(adapter, weight, dtype)
        out = BUFFERS.get("w", weight.shape, weight)
        _weight_into(library, adapter, weight, out)
        return _cast(out, dtype)

    def weight_and_grads(self, adapter: LinearRescale, weight: Tensor, dw: Tensor, wanted: Sequence[Tensor],
                         create: bool, dtype: torch.dtype | None = None) -> tuple[Tensor, list[Tensor | None]]:
        library = None if create or any(t is weight for t in wanted) else self._takes(adapter, weight)
        if library is None:
            return super().weight_and_grads(adapter, weight, dw, wanted, create, dtype)
        s_left, s_right = (t.contiguous() for t in _scales(adapter))
        dw = dw.to(weight.dtype).contiguous()  # (bf16 from the GEMM under autocast)
        out = BUFFERS.get("w", weight.shape, weight)
        d_left, d_right = torch.empty_like(s_left), torch.empty_like(s_right)
        getattr(library, f"rlrr_weight_and_grads_{_SUFFIX[weight.dtype]}")(
            weight.data_ptr(), s_left.data_ptr(), s_right.data_ptr(), dw.data_ptr(), out.data_ptr(),
            d_left.data_ptr(), d_right.data_ptr(), *_sizes(weight, s_left))
        found = {id(adapter.rlrr_s_left): d_left, id(adapter.rlrr_s_right): d_right}
        return _cast(out, dtype), [found.get(id(t)) for t in wanted]

    def fold_into(self, adapter: LinearRescale, weight: Tensor) -> bool:
        """Eq. 20 written over `weight` by the forward loop, one pass; False (nothing written) where it does not apply.

        In place is safe: each W' entry reads only its own W entry. `weight` must be the layer's
        float32/float64 matrix on CPU, like the adapter's scales.
        """
        library = self._takes(adapter, weight)
        if library is None:
            return False
        _weight_into(library, adapter, weight, weight)
        increment_version(weight)  # written through a pointer: autograd's checks and the adapters' caches must see it
        return True


def _weight_into(library: ctypes.CDLL, adapter: LinearRescale, weight: Tensor, out: Tensor) -> None:
    """The forward loop: W' of `weight` into `out` (contiguous, weight's shape; `weight` itself for a fold)."""
    s_left, s_right = (t.contiguous() for t in _scales(adapter))
    getattr(library, f"rlrr_weight_{_SUFFIX[weight.dtype]}")(
        weight.data_ptr(), s_left.data_ptr(), s_right.data_ptr(), out.data_ptr(), *_sizes(weight, s_left))


def _sizes(weight: Tensor, s_left: Tensor) -> tuple[int, int, int, int]:
    """(out, in, chunks, rank) for the loops."""
    return weight.shape[0], weight.shape[1], s_left.shape[0], s_left.shape[1]


NATIVE = NativeKernels()

__all__ = ["NATIVE", "NativeKernels", "build"]
