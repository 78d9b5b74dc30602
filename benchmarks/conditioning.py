"""`python -m benchmarks.conditioning [--model visformer_tiny] [--seeds 0 1 2]`: why a random model's
fp32 export can miss 1e-4 (docs/export.md, "Conditioning").

For the model as `python -m export.onnx --model NAME --seed S` builds it (random base woken by
`export.wake`, seeded random rank-1 adapter) and for timm's plain init: whether the fold is exact,
PyTorch's own float32-vs-float64 error of the output and of each module the export localisation
names, and the largest attention logit of every `attn` module with a `qkv` conv or linear. Prints a
table; writes nothing.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import export
import zoo


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, out) -> None:  # returns None: the output is left as it is
            if isinstance(out, torch.Tensor):
                found.setdefault(name, out.detach())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n and "parametrizations" not in n]
    try:
        found[""] = model(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def _attention_logits(model: nn.Module, outputs: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |q·k * scale| over the attention modules whose qkv output was captured (timm's layouts), and where."""
    worst, where = 0.0, "-"
    for name, m in model.named_modules():
        qkv = outputs.get(f"{name}.qkv")
        if qkv is None or not hasattr(m, "num_heads"):
            continue
        b, heads = qkv.shape[0], m.num_heads
        tokens = qkv.reshape(b, 3, heads, -1, qkv.shape[-2] * qkv.shape[-1]).permute(1, 0, 2, 4, 3) if qkv.dim() == 4 \
            else qkv.reshape(b, qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = tokens[0], tokens[1]
        value = float(((q @ k.transpose(-2, -1)) * m.scale).abs().max())
        worst, where = max((worst, where), (value, name))
    return worst, where


def row(label: str, model: nn.Module, x: torch.Tensor) -> str:
    low, high = _outputs(model, x), _outputs(copy.deepcopy(model).double(), x.double())
    modules = sorted(((n, _relative(low[n], high[n])) for n in low if n and low[n].shape == high[n].shape), key=lambda p: -p[1])[:2]
    logit, where = _attention_logits(model, low)
    return (f"| {label} | {_relative(low[''], high['']):.1e} | {float(high[''].abs().max()):.4g} | {logit:.4g} ({where}) | "
            + ", ".join(f"{n} {e:.1e}" for n, e in modules) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conditioning", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="visformer_tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    shape = (3, 224, 224)
    print("| model | fp32 vs fp64 (output) | max |logit| | max attention logit | worst modules, fp32 vs fp64 |\n|---|---|---|---|---|")
    for seed in args.seeds:
        x = export.make_inputs(shape, [4], 1, seed)[0]
        with torch.random.fork_rng(devices=[]):  # as export.pipeline builds a random base
            torch.manual_seed(seed)
            plain, _ = zoo.build_model(args.model)
        woken = copy.deepcopy(plain)
        export.wake(woken, seed)
        adapted = copy.deepcopy(woken)
        export.random_adapter(adapted, seed=seed, rank=1)
        folded = export.fold(copy.deepcopy(adapted.eval())).eval()
        with torch.no_grad():
            exact = torch.equal(folded(x), adapted(x))
        print(row(f"seed {seed}, timm init", plain.eval(), x))
        print(row(f"seed {seed}, woken base", woken, x))
        print(row(f"seed {seed}, woken + random adapter (fold exact in fp32: {exact})", adapted, x))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
