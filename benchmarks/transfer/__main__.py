"""`python -m benchmarks.transfer`: the transfer benchmark (see benchmarks/transfer/__init__.py).

    python -m benchmarks.transfer             # 3 tasks x 6 rows x 3 seeds, lr sweep, exports: ~45 min on 2 quiet cores
    python -m benchmarks.transfer --quick     # digits, seed 0, the committed run's learning rates: ~5 min (backbone cached)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # reason: before torch loads OpenMP; spinning threads stall a shared CPU

import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.transfer import backbone, report, run, tasks  # noqa: E402
from benchmarks.transfer.methods import METHODS  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
QUICK_TASK = "digits"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_TASK} only, seed 0, learning rates from the committed results; "
                                                        f"writes transfer_quick.* and compares with the committed row")
    p.add_argument("--tasks", nargs="+", choices=list(tasks.TASKS), help="tasks (default: all)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="rows (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, default=run.Settings.epochs, help=f"epochs per run (default {run.Settings.epochs})")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel single-threaded runs (default: 2, or 1 on one core)")
    p.add_argument("--cache", type=Path, default=None, help=f"backbone, data and runs (default {backbone.default_cache()})")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--sweep", action="store_true", help="with --quick: sweep the learning rates instead of reading them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cache = args.cache or backbone.default_cache()
    chosen_task = args.tasks or ([QUICK_TASK] if args.quick else list(tasks.TASKS))
    methods = tuple(args.methods or METHODS)
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    committed = report.read(args.out / "transfer.json") or report.read(RESULTS / "transfer.json")  # --out's full run, else the committed one
    lrs = {}
    if args.quick and not args.sweep and committed:
        lrs = {t: {m: r["lr"] for m, r in committed["tasks"][t]["methods"].items() if m in methods}
               for t in chosen_task if t in committed["tasks"]}
    settings = run.Settings(tasks=tuple(chosen_task), methods=methods, seeds=seeds, epochs=args.epochs, jobs=args.jobs, lrs=lrs)
    command = "python -m benchmarks.transfer" + (" " + shlex.join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    print(f"transfer benchmark: tasks {list(settings.tasks)}, rows {list(methods)}, seeds {list(seeds)}, {settings.epochs} epochs, "
          f"{settings.jobs} workers; cache {cache}" + ("; learning rates from the committed results" if lrs else ""), flush=True)
    raw = run.benchmark(settings, cache, log=lambda s: print(s, flush=True))
    doc = report.document(raw, command)
    if args.quick:
        files = report.write(doc, args.out, stem="transfer_quick", picture=False)
    else:
        doc["files"] = {"dir": str((args.out / "transfer").relative_to(RESULTS.parents[1]) if args.out == RESULTS else args.out / "transfer"),
                        **run.keep_files(raw, args.out / "transfer")}
        files = report.write(doc, args.out)
    print()
    print(report.summary_table(doc))
    print(f"\nwall time {raw['wall_s'] / 60:.1f} min; results: {', '.join(str(f) for f in files)}")
    if args.quick and committed:
        print(compare(doc, committed))
    return 0


def compare(quick: dict, committed: dict) -> str:
    """The quick run's accuracy beside the committed run's seed 0 and mean ± std."""
    lines = ["", "quick run vs committed results (test accuracy %):", f"{'task':18} {'method':10} {'quick':>6} {'seed 0':>7} {'mean ± std':>12}"]
    for t, task in quick["tasks"].items():
        for m, r in task["methods"].items():
            old = committed["tasks"].get(t, {}).get("methods", {}).get(m)
            if old is None:
                continue
            mean, std = report.mean_std(old["accuracy"])
            seed0 = old["accuracy"][old["seeds"].index(0)] if 0 in old.get("seeds", []) else float("nan")
            lines.append(f"{t:18} {m:10} {100 * r['accuracy'][0]:6.1f} {100 * seed0:7.1f} {100 * mean:6.1f} ± {100 * std:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
