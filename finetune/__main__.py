"""`python -m finetune`: fine-tune a zoo preset's RLRR adapters and head with the paper's recipe.

    python -m finetune --preset vit_tiny_patch16_224 --epochs 2 --output runs/smoke      # generated data
    python -m finetune --preset vit_base_patch16_224 --weights ViT-B_16.npz \\
        --data vtab-1k/cifar --dataset cifar100 --protocol final --output runs/cifar
    torchrun --nproc_per_node 2 -m finetune ...                                          # DDP
    python -m finetune --resume --output runs/cifar                                      # continue exactly

The output folder then holds last.safetensors, best.safetensors (adapters, head and the metadata
`python -m export.onnx --adapter FILE` builds the model from), metrics.csv, metrics.json and
checkpoints/epoch-NNNN.pt (the training state --resume reads).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from finetune.config import AMP, PROGRESS, FinetuneConfig
from finetune.data import CROPS, PROTOCOLS
from finetune.errors import DivergedError, ResourceError, environment_errno
from rlrr import RLRRError

# the export CLI's numbers where the meaning is shared (2, 5, 70, 130)
EXIT_OK, EXIT_INPUT, EXIT_ENVIRONMENT, EXIT_DIVERGED, EXIT_BUG, EXIT_INTERRUPTED = 0, 2, 5, 6, 70, 130
SUPPRESS = argparse.SUPPRESS
DEBUG_ENV = "RLRR_DEBUG"

EPILOG = """\
Defaults: Table 3 of the paper (AdamW, cosine decay, 100 epochs, 10 warm-up epochs) and the
official code (lr 3e-3, weight decay 5e-5, batch 32, seed 42); --dataset NAME takes the official
per-dataset lr, weight decay, drop path, flip and batch size (--list-datasets). Without --data a
small dataset is generated in memory: a smoke test, not a benchmark. Without --weights the model
is random. --batch-size is the global batch of one update: processes x micro-batch x --accum.

exit status:
  0    done
  2    bad input: options, data (one class, undecodable or missing images ...), output folder,
       checkpoint; found before training: nothing trained, nothing written
  5    the environment refused: disk full, permission denied, read-only file system, out of memory;
       the last complete checkpoint is intact (continue with --resume once fixed)
  6    training diverged (the loss became NaN or infinite): the last complete epoch's files are intact
  70   an internal error (a bug): please report it with the traceback of --debug
  130  interrupted: the last complete checkpoint is intact (continue with --resume)
Every failure prints one line on stderr; --debug (or RLRR_DEBUG=1) adds the traceback.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=SUPPRESS)
    m = p.add_argument_group("model")
    m.add_argument("--preset", metavar="NAME", help="zoo preset (default vit_base_patch16_224; python -m zoo.params lists them)")
    m.add_argument("--tiny", action="store_true", help="the preset's test-size twin (32-64 px, seconds per epoch on a CPU)")
    m.add_argument("--weights", metavar="FILE", help="local pretrained weights: .npz (Google ViT, read by timm), .safetensors, .pth")
    m.add_argument("--rank", type=int, help="RLRR rank (default: the preset's, 1)")
    m.add_argument("--init", choices=("paper", "identity"), help="adapter init: paper (official, Table 10; default) or identity")
    m.add_argument("--targets", nargs="+", metavar="PATTERN", help="RLRR sites instead of the preset's placement (rlrr.apply targets)")
    m.add_argument("--img-size", type=int, help="input size (default: the preset's)")
    m.add_argument("--drop-path", type=float, help="stochastic depth rate, timm models (default: the dataset preset's, else 0)")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="DIR", help="ImageFolder tree, VTAB-1k lists or FGVC json files; omitted: generated data")
    d.add_argument("--dataset", metavar="NAME", help="a VTAB-1k/FGVC recipe preset (--list-datasets)")
    d.add_argument("--protocol", choices=PROTOCOLS, help="tune: train/val (default); final: train+val, evaluate on test (official)")
    d.add_argument("--crop", choices=CROPS, help="train crop: resize (VTAB), random-resized (FGVC, the paper), resize-random (official FGVC code)")
    d.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip (default on, or the dataset preset's)")
    d.add_argument("--workers", type=int, help="DataLoader workers (default 0 for generated data, else min(4, CPUs))")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="leave out image files that cannot be decoded (counted, with a warning) instead of refusing the data")
    r = p.add_argument_group("recipe")
    r.add_argument("--epochs", type=int, help="epochs (default 100, Table 3)")
    r.add_argument("--batch-size", type=int, help="global batch per update (default 32, or the dataset preset's)")
    r.add_argument("--accum", type=int, help="gradient accumulation steps per update (default 1)")
    r.add_argument("--lr", type=float, help="peak learning rate (default 3e-3, or the dataset preset's)")
    r.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 5e-5, or the dataset preset's)")
    r.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs (default min(10, epochs/10))")
    r.add_argument("--cooldown-epochs", type=float, help="epochs at min lr after the cosine (default 0; the official scripts add 10)")
    r.add_argument("--min-lr", type=float, help="lr at the end of the cosine (default 1e-8, official)")
    r.add_argument("--warmup-lr", type=float, help="lr at the start of warm-up (default 1e-7, official)")
    r.add_argument("--label-smoothing", type=float, help="label smoothing (default 0; 0.1 with --mixup)")
    r.add_argument("--mixup", action="store_true", help="timm Mixup/CutMix with the official AugReg values")
    r.add_argument("--drop-last", action=argparse.BooleanOptionalAction, help="drop the last incomplete batch (default off)")
    r.add_argument("--amp", choices=AMP, help="mixed precision: auto (bf16 on CUDA, off on CPU; default), off, bf16, fp16 (CUDA)")
    r.add_argument("--device", help="auto (default), cpu, cuda")
    r.add_argument("--seed", type=int, help="seed of everything random (default 42)")
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="DIR", help="run folder (default ./output)")
    o.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue a run exactly: its newest checkpoint (no PATH: --output's), a run folder or a checkpoint file")
    o.add_argument("--force", action="store_true", help="start over in an output folder that holds a run (its files are replaced)")
    o.add_argument("--progress", choices=PROGRESS, help="auto (a bar on a terminal, else lines; default), bar, lines, none")
    o.add_argument("--quiet", action="store_true", help="print nothing but errors")
    o.add_argument("--log-every", type=int, help="in lines mode, a line every N updates (default: about ten an epoch for epochs of 20+ updates)")
    o.add_argument("--no-test", action="store_true", help="do not evaluate the best checkpoint on the test split at the end")
    p.add_argument("--list-datasets", action="store_true", help="print the VTAB-1k/FGVC recipe presets and exit")
    p.add_argument("--debug", action="store_true", help=f"on failure, print the traceback too (or set {DEBUG_ENV}=1)")
    p.error = lambda message: _usage_error(p, message)  # type: ignore[method-assign]
    return p


def _usage_error(p: argparse.ArgumentParser, message: str) -> None:
    """argparse's errors as one line (its default prints the whole usage block first)."""
    _say(f"{p.prog}: error: {message} (see --help)")
    sys.exit(EXIT_INPUT)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The run's config: defaults, or the resumed checkpoint's options, overridden by the flags given."""
    given = dict(vars(args))
    given.pop("list_datasets", None)
    given.pop("debug", None)
    if given.pop("quiet", False):
        given["progress"] = "none"
    if given.pop("no_test", False):
        given["evaluate_test"] = False
    if "targets" in given:
        given["targets"] = tuple(given["targets"])
    base = {}
    if "resume" in given:
        from finetune import checkpoint as ckpt

        source = ckpt.resolve_resume(given["resume"], Path(given.get("output", FinetuneConfig.output)))
        stored = ckpt.load_state(source)["config"]
        base = {k: v for k, v in stored.items() if k != "classes"}
    return FinetuneConfig.from_dict({**base, **given})


def list_datasets() -> str:
    from finetune.recipe import DATASETS

    lines = [f"{'name':22} {'benchmark':9} {'official':22} {'classes':>7} {'lr':>7} {'wd':>7} {'drop path':>9} {'flip':>5}",
             "(values from the official configs, github.com/zstarN70/RLRR RLRRDatasets/VTABConfig.py, FGVCConfig.py; batch 32)"]
    for name, r in DATASETS.items():
        lines.append(f"{name:22} {r.benchmark:9} {r.official:22} {r.num_classes:7} {r.lr:7g} {r.weight_decay:7g} {r.drop_path:9g} "
                     f"{'yes' if r.flip else 'no':>5}" + ("  drop_last" if r.drop_last else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if getattr(args, "list_datasets", False):
        print(list_datasets())
        return EXIT_OK
    from finetune.loop import finetune

    config = None
    try:
        config = config_from_args(args)
        finetune(config)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _interrupted(config)
        return EXIT_INTERRUPTED
    except Exception as e:  # every failure: one line (and the traceback with --debug), a status by its class
        if debug:
            traceback.print_exc()
        status, line = classify(e)
        if status == EXIT_ENVIRONMENT:
            line += _resume_note(config)
        _say(f"finetune: {line}")
        return status
    return EXIT_OK


def classify(e: BaseException) -> tuple[int, str]:
    """An exception's exit status and the one line that reports it."""
    if isinstance(e, DivergedError):
        return EXIT_DIVERGED, f"error: {e}"
    if _out_of_memory(e):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return EXIT_ENVIRONMENT, f"error (environment): out of memory ({first}): lower --batch-size (--accum keeps the update) or --img-size"
    if isinstance(e, ResourceError) or environment_errno(e) is not None:
        return EXIT_ENVIRONMENT, f"error (environment): {e}"
    if isinstance(e, RLRRError):
        return EXIT_INPUT, f"error: {e}"
    if isinstance(e, OSError) and e.errno is not None:  # the file system disagreed with what the checks saw (a file removed meanwhile ...)
        return EXIT_ENVIRONMENT, f"error (environment): {e}"
    return EXIT_BUG, f"internal error (a bug; rerun with --debug for the traceback and report it): {type(e).__name__}: {e}"


def _out_of_memory(e: BaseException) -> bool:
    import torch

    # reason: a failed CPU allocation is a plain RuntimeError from c10's allocator, recognisable only by its text
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def _say(text: str) -> None:
    """One line on stderr: control characters escaped (a hostile file name cannot move the cursor or
    forge a second line), the lines of a multi-line message joined."""
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], text)
    print(text, file=sys.stderr, flush=True)


def _resume_note(config: FinetuneConfig | None) -> str:
    from finetune import checkpoint as ckpt

    states = ckpt.list_states(Path(config.output)) if config is not None else []
    return (f"; the last complete checkpoint is {states[-1][1]}: continue with --resume --output {config.output} once fixed"
            if states else "")


def _interrupted(config: FinetuneConfig | None) -> None:
    from finetune import checkpoint as ckpt

    if config is None or os.environ.get("RANK", "0") != "0":
        return
    output = Path(config.output)
    states = ckpt.list_states(output)
    if states:
        print(f"\nfinetune: interrupted; the last complete checkpoint is {states[-1][1]} (epoch {states[-1][0]}). "
              f"Continue with: python -m finetune --resume --output {output}", file=sys.stderr)
    else:
        print("\nfinetune: interrupted before the first epoch ended: no checkpoint was written", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
