"""Where a model keeps its named adapters: the bank, a plain attribute outside the module tree.

`rlrr.multi` manages it (add, activate, combine ...); `apply` asks whether one exists, and
removing the rewrite for good (`rlrr.remove_rewrite`, what fold calls) forgets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from rlrr.adapter_file import AdapterSet

_ATTRIBUTE = "_rlrr_adapter_bank"  # in the model's __dict__: not a submodule, not in the state dict


@dataclass
class Bank:
    """The named adapters of one model, and which of them are live."""

    sets: dict[str, AdapterSet] = field(default_factory=dict)
    active: tuple[str, ...] = ()


def find_bank(model: nn.Module) -> Bank | None:
    return model.__dict__.get(_ATTRIBUTE)


def set_bank(model: nn.Module, bank: Bank) -> Bank:
    model.__dict__[_ATTRIBUTE] = bank
    return bank


def holds_named_adapters(model: nn.Module) -> bool:
    bank = find_bank(model)
    return bank is not None and bool(bank.sets)


def forget_bank(model: nn.Module) -> Bank | None:
    """Remove the bank from the model; returns it (None if there was none)."""
    return model.__dict__.pop(_ATTRIBUTE, None)
