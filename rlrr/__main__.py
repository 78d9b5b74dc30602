"""`python -m rlrr`: apply RLRR to a timm model (random weights) and print the adapted-layer table."""

from __future__ import annotations

import argparse
import sys
import time

from rlrr.api import apply_plan, make_plan
from rlrr.config import RLRRConfig
from rlrr.errors import RLRRError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlrr", description=__doc__)
    parser.add_argument("--model", default="vit_base_patch16_224", help="a timm model name (built with random weights)")
    parser.add_argument("--num-classes", type=int, default=100, help="classifier size (the head is trained in full)")
    parser.add_argument("--rank", type=int, default=1, help="RLRR rank (App. F)")
    parser.add_argument("--targets", nargs="*", default=None, help="kinds (linear conv norm), globs, or re:<regex>")
    parser.add_argument("--no-fused-chunks", action="store_true", help="one shared s_left on fused qkv projections")
    args = parser.parse_args(argv)
    try:
        import timm

        model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    except Exception as e:  # reason: unknown names and build failures are reported, not raised
        print(f"error: cannot build timm model {args.model!r}: {e}", file=sys.stderr)
        return 2
    head = model.default_cfg.get("classifier", "head") if hasattr(model, "default_cfg") else ()
    start = time.perf_counter()
    try:
        config = RLRRConfig(rank=args.rank, fused_chunks=not args.no_fused_chunks)
        plan = make_plan(model, args.targets, config, trainable=head)
        apply_plan(model, plan)
    except RLRRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(plan.table())
    print(f"trainable after apply: {trainable:,} parameters (adapters + head); apply took {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
