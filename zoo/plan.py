"""`python -m zoo.plan`: apply RLRR to a model built by name (random weights) and print the adapted-layer table.

Any timm or torchvision name (`timm:NAME`, `torchvision:NAME` pick one), or `package.module:function`.
The classifier head (`zoo.classifier_name`) is trained in full, not adapted.
"""

from __future__ import annotations

import argparse
import sys
import time

import rlrr
from zoo.models import build_model, classifier_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="a timm or torchvision model name (built with random weights)")
    parser.add_argument("--num-classes", type=int, default=100, help="classifier size (the head is trained in full)")
    parser.add_argument("--rank", type=int, default=1, help="RLRR rank (App. F)")
    parser.add_argument("--targets", nargs="*", default=None, help="kinds (linear conv norm), globs, or re:<regex>")
    parser.add_argument("--no-fused-chunks", action="store_true", help="one shared s_left on fused qkv projections")
    args = parser.parse_args(argv)
    try:
        model, _ = build_model(args.model, num_classes=args.num_classes)
    except rlrr.RLRRError as e:  # unknown names and failed builds (zoo.UnknownModelError)
        print(f"error: cannot build model {args.model!r}: {e}", file=sys.stderr)
        return 2
    head = classifier_name(model)
    try:
        config = rlrr.RLRRConfig(rank=args.rank, fused_chunks=not args.no_fused_chunks)
        start = time.perf_counter()
        plan = rlrr.plan(model, args.targets, config=config, trainable=head or ())
        rlrr.apply_plan(model, plan)
        seconds = time.perf_counter() - start
    except rlrr.RLRRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(plan.table())
    print(f"trainable after apply: {trainable:,} parameters (adapters + head); apply took {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
