"""The rewrite and its undo: the one module that handles `torch.nn.utils.parametrize` and its internals.

`apply` registers each adapter as the parametrization of the tensor an op reads (design.md §3),
sometimes on a tensor it had to create first (a bias for a shift, γ for a norm without affine).
Everything that takes a rewrite away goes through `remove`: fold (the adapted values written into
the originals first, so created tensors stay as real parameters), and undo (rollback of a failed
`apply`, `disable_adapters`, switching named adapters: created tensors go back to None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapters import Adapter, BiasOf
from rlrr.errors import RLRRError


class Undo:
    """A stack of undo steps, run in reverse on failure."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []

    def push(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def run(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


def create_tensor(owner: nn.Module, attr: str, value: Tensor, undo: Undo) -> None:
    """Give a layer a frozen buffer where its weight or bias slot is None; `remove` settles its fate."""
    owner._parameters.pop(attr, None)
    owner.register_buffer(attr, value)
    undo.push(lambda: _settle_created(owner, attr, keep=False))


def _settle_created(owner: nn.Module, attr: str, *, keep: bool) -> None:
    """A created tensor becomes a real frozen parameter (fold) or goes back to None (undo)."""
    value = owner._buffers.pop(attr)
    owner.register_parameter(attr, nn.Parameter(value, requires_grad=False) if keep else None)
    if keep and hasattr(owner, "elementwise_affine"):  # a LayerNorm that was built without affine
        owner.elementwise_affine = True


def register(module: nn.Module, attr: str, parametrization: nn.Module, undo: Undo) -> None:
    """Register `parametrization` on `module.attr`, with its removal pushed onto `undo`."""
    # reason: unsafe=True skips parametrize's trial evaluation of W' (seconds on ViT-B); adapters keep
    # the tensor's shape and dtype by construction, which tests/test_adapters.py checks.
    parametrize.register_parametrization(module, attr, parametrization, unsafe=True)
    undo.push(lambda: _unregister(module, attr))


def set_class_forward(module: nn.Module, forward: Callable, undo: Undo) -> None:
    """Put `forward` on the class parametrize generated for this one module.

    Removing the module's parametrizations restores its own class, and the forward with it.
    """
    cls = type(module)
    cls.forward = forward
    undo.push(lambda: cls.__dict__.get("forward") is forward and delattr(cls, "forward"))


def user_class(module: nn.Module) -> type:
    """The module's own class, under the one parametrize generates for a parametrized module."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its class before a parametrization is removed.

    `copy.deepcopy` of a parametrized module shares PyTorch's generated `Parametrized<X>` class,
    and `remove_parametrizations` deletes the property from that class: removing it from one copy
    would break the other (an EMA copy, the unmerged reference kept for verification).
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _unregister(module: nn.Module, attr: str) -> Tensor:
    """Remove a parametrization without folding it; returns the original tensor, back in place."""
    original = module.parametrizations[attr].original
    _own_class(module)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    return original


@dataclass(frozen=True)
class AdaptedTensor:
    """One tensor an adapter rewrites: where it is held, the adapter, and the frozen original."""

    module_name: str
    module: nn.Module
    attr: str  # "weight", "bias", "in_proj_weight" ...
    adapter: Adapter
    is_bias: bool  # the tensor is the site's bias (rewritten through `BiasOf`)

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    @property
    def original(self) -> Tensor:
        return self.module.parametrizations[self.attr].original


def adapted_tensors(model: nn.Module) -> list[AdaptedTensor]:
    """Every tensor RLRR rewrites in `model`, tied weights once per holder, in module order."""
    return list(_adapted(model))


def _adapted(model: nn.Module) -> Iterator[AdaptedTensor]:
    for name, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr, plist in m.parametrizations.items():
            first = plist[0]
            if not isinstance(first, (Adapter, BiasOf)):
                continue
            if len(plist) > 1:
                raise RLRRError(f"{name}.{attr} has other parametrizations stacked with RLRR; they cannot be removed in order")
            adapter = first if isinstance(first, Adapter) else first.adapter
            yield AdaptedTensor(name, m, attr, adapter, isinstance(first, BiasOf))


def remove(model: nn.Module, write: Callable[[AdaptedTensor], None] | None = None) -> list[str]:
    """Take every RLRR rewrite out of `model`, in place; returns the created tensors kept.

    With `write` (fold), `write(t)` first writes the adapted value into `t.original` in place, once
    per tensor (tied weights are written through their first holder), and tensors `apply` created
    stay as real frozen parameters. Without it (undo) the originals come back untouched and the
    created tensors go back to None.
    """
    written: set[int] = set()
    kept = []
    for t in adapted_tensors(model):
        original = t.original
        if write is not None and id(original) not in written:
            write(t)
            written.add(id(original))
        _unregister(t.module, t.attr)
        if not isinstance(original, nn.Parameter):  # a tensor `apply` created
            _settle_created(t.module, t.attr, keep=write is not None)
            if write is not None:
                kept.append(t.name)
    return kept


def adapters_of(model: nn.Module) -> list[Adapter]:
    """Every RLRR adapter in the model, once each, in registration order."""
    return [m for m in model.modules() if isinstance(m, Adapter)]


def is_rewritten(module: nn.Module, attr: str) -> bool:
    """Whether `module.attr` carries a parametrization (ours or anyone's)."""
    return parametrize.is_parametrized(module, attr)
