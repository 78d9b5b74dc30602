"""Rewrite the eager model in place: register adapters on the sites' tensors, freeze the rest.

Each site's adapter is registered (rlrr/rewrite.py) on every module attribute that holds its
weight (tied weights share one adapter), and a `BiasOf` view on its bias. If anything fails
half-way, everything done so far is undone before the error propagates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from adapters import Adapter, BiasOf, ChannelScaleShift, NormScaleShift
from rlrr.config import RLRRConfig
from rlrr.errors import RLRRError
from rlrr.linear_forward import linear_forward, takes_linear_forward
from rlrr.rewrite import Undo, create_tensor, register, remove, set_class_forward
from rlrr.sites import BIAS_CREATABLE, Site, effective_chunks, rescale_class, shifts


def build_adapter(site: Site, weight: Tensor, config: RLRRConfig) -> Adapter:
    """The adapter for one site, told its site and config (what save and fold read back)."""
    if site.kind == "norm":
        adapter: Adapter = NormScaleShift(weight, init=config.init, shift=shifts(site, config))
    elif site.method == "ssf":
        adapter = ChannelScaleShift(weight, init=config.init, shift=shifts(site, config))
    else:
        adapter = rescale_class(site.kind)(
            weight, rank=config.rank, chunks=effective_chunks(site, config), scaling=config.weight_scaling, shift=shifts(site, config), init=config.init
        )
    adapter.site, adapter.config = site, config
    return adapter


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(tensor) -> every (module, attribute) that holds it, tied weights included."""
    out: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for m in model.modules():
        for attr, p in m.named_parameters(recurse=False):
            out[id(p)].append((m, attr))
    return out


def _factory(owner: nn.Module) -> dict:
    t = next(owner.parameters(), None)
    return {"dtype": t.dtype, "device": t.device} if t is not None else {}


def attach(model: nn.Module, sites: Iterable[Site], config: RLRRConfig, trainable: Iterable[str] = ()) -> list[Adapter]:
    """Adapt `sites` in place and set requires_grad: adapters and `trainable` modules only."""
    undo = Undo()
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


def _attach_site(model: nn.Module, site: Site, config: RLRRConfig, holders: dict, undo: Undo) -> Adapter:
    owner = model.get_submodule(site.module)
    if site.weight_missing:  # a LayerNorm without affine parameters: γ = 1, β = 0
        create_tensor(owner, site.weight, torch.ones(site.shape, **_factory(model)), undo)
    weight = getattr(owner, site.weight)
    adapter = build_adapter(site, weight, config)
    adapter.train(owner.training)  # eval mode caches W' (adapters/base.py): follow the model's mode
    for module, attr in holders.get(id(weight), [(owner, site.weight)]):
        register(module, attr, adapter, undo)
        if attr == "weight" and takes_linear_forward(module):
            set_class_forward(module, linear_forward, undo)
    if adapter.adapts_bias:
        if site.bias_state == BIAS_CREATABLE:
            shape = tuple(weight.shape) if site.kind == "norm" else (weight.shape[0],)
            create_tensor(owner, site.bias, torch.zeros(shape, dtype=weight.dtype, device=weight.device), undo)
        bias = getattr(owner, site.bias)
        view = BiasOf(adapter)
        for module, attr in holders.get(id(bias), [(owner, site.bias)]):
            register(module, attr, view, undo)
    return adapter


def detach(model: nn.Module) -> None:
    """Remove every live adapter without folding it: the model computes its base function again.

    Tensors that `apply` created (a bias for a shift, γ/β of a norm without affine) go back to None.
    """
    remove(model)
