"""Rewrite the eager model in place: register adapters on the sites' tensors, freeze the rest.

Each site's adapter is registered with `torch.nn.utils.parametrize` on every module attribute
that holds its weight (tied weights share one adapter), and a `BiasOf` view on its bias. If
anything fails half-way, everything done so far is undone before the error propagates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapters import Adapter, BiasOf, NormScaleShift
from adapters.fused import fusable, linear_forward
from rlrr.config import RLRRConfig
from rlrr.errors import RLRRError
from rlrr.sites import BIAS_CREATABLE, Site, effective_chunks, rescale_class, shifts


def build_adapter(site: Site, weight: Tensor, config: RLRRConfig) -> Adapter:
    """The adapter for one site, with its site and config attached for save/fold."""
    if site.kind == "norm":
        adapter: Adapter = NormScaleShift(weight, init=config.init)
    elif site.method == "ssf":
        adapter = NormScaleShift(weight, init=config.init, per_output_channel=True)
        adapter.kind = "ssf"
    else:
        adapter = rescale_class(site.kind)(
            weight, rank=config.rank, chunks=effective_chunks(site, config), scaling=config.weight_scaling, shift=shifts(site, config), init=config.init
        )
    adapter.site = site
    adapter.config = config
    return adapter


def adapters_of(model: nn.Module) -> list[Adapter]:
    """Every RLRR adapter in the model, once each, in registration order."""
    return [m for m in model.modules() if isinstance(m, Adapter)]


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(tensor) -> every (module, attribute) that holds it, tied weights included."""
    out: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for m in model.modules():
        for attr, p in m.named_parameters(recurse=False):
            out[id(p)].append((m, attr))
    return out


class _Undo:
    """A stack of undo steps, run in reverse on failure."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []

    def push(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def run(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


def _create_tensor(owner: nn.Module, attr: str, value: Tensor, undo: _Undo) -> None:
    """Give a torch.nn layer a frozen buffer where its weight/bias is None (folded to a parameter later)."""
    owner._parameters.pop(attr, None)
    owner.register_buffer(attr, value)

    def restore() -> None:
        del owner._buffers[attr]
        owner.register_parameter(attr, None)

    undo.push(restore)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its class before a parametrization is removed.

    `copy.deepcopy` of a parametrized module shares PyTorch's generated `Parametrized<X>` class,
    and `remove_parametrizations` deletes the property from that class: removing it from one copy
    would break the other (an EMA copy, the unmerged reference kept for verification).
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def unregister(module: nn.Module, attr: str) -> Tensor:
    """Remove a parametrization without folding it; returns the original tensor, back in place."""
    original = module.parametrizations[attr].original
    _own_class(module)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    return original


def _register(module: nn.Module, attr: str, parametrization: nn.Module, undo: _Undo) -> None:
    # reason: unsafe=True skips parametrize's trial evaluation of W' (seconds on ViT-B); adapters keep
    # the tensor's shape and dtype by construction, which tests/test_adapters.py checks.
    parametrize.register_parametrization(module, attr, parametrization, unsafe=True)
    undo.push(lambda: unregister(module, attr))


def _fuse(module: nn.Module, undo: _Undo) -> None:
    """Give an adapted nn.Linear the fused training forward (adapters/fused.py).

    It goes on the class parametrize generated for this one module, so removing the
    parametrizations (fold, undo) restores the plain class and its forward with it.
    """
    cls = type(module)
    cls.forward = linear_forward
    undo.push(lambda: cls.__dict__.get("forward") is linear_forward and delattr(cls, "forward"))


def _factory(owner: nn.Module) -> dict:
    t = next(owner.parameters(), None)
    return {"dtype": t.dtype, "device": t.device} if t is not None else {}


def attach(model: nn.Module, sites: Iterable[Site], config: RLRRConfig, trainable: Iterable[str] = ()) -> list[Adapter]:
    """Adapt `sites` in place and set requires_grad: adapters and `trainable` modules only."""
    undo = _Undo()
    flags = {p: p.requires_grad for p in model.parameters()}
    undo.push(lambda: [p.requires_grad_(f) for p, f in flags.items()])
    holders = _holders(model)
    adapters = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for site in sites:
            adapters.append(_attach_site(model, site, config, holders, undo))
        for path in trainable:
            for p in model.get_submodule(path).parameters():
                p.requires_grad_(True)
    except Exception as e:
        undo.run()
        if isinstance(e, RLRRError):
            raise
        raise RLRRError(f"adapting the model failed and was undone: {type(e).__name__}: {e}") from e
    return adapters


def _attach_site(model: nn.Module, site: Site, config: RLRRConfig, holders: dict, undo: _Undo) -> Adapter:
    owner = model.get_submodule(site.module)
    if site.weight_missing:  # a LayerNorm without affine parameters: γ = 1, β = 0
        _create_tensor(owner, site.weight, torch.ones(site.shape, **_factory(model)), undo)
    weight = getattr(owner, site.weight)
    adapter = build_adapter(site, weight, config)
    adapter.train(owner.training)  # eval mode caches W' (adapters/base.py): follow the model's mode
    for module, attr in holders.get(id(weight), [(owner, site.weight)]):
        _register(module, attr, adapter, undo)
        if attr == "weight" and fusable(module):
            _fuse(module, undo)
    if adapter.adapts_bias:
        if site.bias_state == BIAS_CREATABLE:
            _create_tensor(owner, site.bias, torch.zeros(adapter_bias_shape(site, weight), dtype=weight.dtype, device=weight.device), undo)
        bias = getattr(owner, site.bias)
        view = BiasOf(adapter)
        for module, attr in holders.get(id(bias), [(owner, site.bias)]):
            _register(module, attr, view, undo)
    return adapter


def detach(model: nn.Module) -> None:
    """Remove every live adapter without folding it: the model computes its base function again.

    Tensors that `apply` created (a bias for a shift, γ/β of a norm without affine) go back to None.
    """
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr in list(m.parametrizations):
            if isinstance(m.parametrizations[attr][0], (Adapter, BiasOf)):
                original = unregister(m, attr)
                if not isinstance(original, nn.Parameter):
                    del m._buffers[attr]
                    m.register_parameter(attr, None)


def adapter_bias_shape(site: Site, weight: Tensor) -> tuple[int, ...]:
    return tuple(weight.shape) if site.kind == "norm" else (weight.shape[0],)
