"""The benchmark's one command: `python -m benchmarks [--quick]`.

Runs every measurement in its own worker process (benchmarks/worker.py), then writes
`results/benchmark.json`, `results/benchmark.md` and `results/benchmark.png` (benchmarks/report.py).
The default run (ViT-S/16, ViT-B/16, ViT-H/14 apply/fold/ONNX) takes about 25 minutes on 2
cores, half as long again under load; `--quick` (ViT-S/16 only, fewer rounds) about 6.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import measure as M
from benchmarks.report import write_reports

RESULTS = Path(__file__).parent / "results"
MAIN = ["full", "linear_probe", "rlrr", "lora_r8", "ssf"]
ABLATIONS = ["rlrr_linears", "rlrr_parametrize"]  # like-for-like placement; without the recompute Function


def plan(args: argparse.Namespace) -> list[dict]:
    """The task specs, in the order they run."""
    quick = args.quick
    models = ["vit_s16"] if quick else args.models
    tasks: list[dict] = []
    for i, model in enumerate(models):
        small = i == 0
        variants = MAIN + (ABLATIONS if small else [])
        rounds = 4 if quick else 6
        tasks.append({"task": "train_timing", "model": model, "variants": variants + ["dense_floor"], "rounds": rounds, "warmup": 1})
        tasks += [{"task": "train_memory", "model": model, "variant": v, "steps": 2} for v in variants]
        tasks.append({"task": "gemm_floor", "model": model, "rounds": 3, "warmup": 1})
        # one call varies by ±10 % here even when idle: ratios need a few dozen rounds to settle within ±3 %
        tasks.append({"task": "inference", "model": model, "rounds": 12 if quick else (24 if small else 14), "warmup": 2})
        tasks.append({"task": "onnx", "model": model, "rounds": 16 if quick else (30 if small else 20), "warmup": 2})
    if args.big and not quick:
        tasks.append({"task": "big_apply_fold", "model": args.big})
        if not args.skip_big_onnx:
            tasks.append({"task": "big_onnx", "model": args.big})
    return tasks


def wait_quiet(below: float, limit_s: float) -> float:
    """Sleep until the 1-minute load average drops below `below` (the machine is shared); seconds waited."""
    t = time.perf_counter()
    while M.load()[0] >= below and time.perf_counter() - t < limit_s:
        time.sleep(5)
    return time.perf_counter() - t


def run_task(spec: dict, threads: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        kwargs = {k: v for k, v in spec.items() if k != "waited_s"}
        cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps({**kwargs, "threads": threads}), str(out)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
            result = json.loads(out.read_text()) if out.exists() else {"ok": False, "error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}"}
        except subprocess.TimeoutExpired:
            result = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    return {"spec": spec, "wall_s": time.perf_counter() - t, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ViT-S/16 only, fewer rounds (about 6 minutes)")
    p.add_argument("--models", type=lambda s: s.split(","), default=["vit_s16", "vit_b16"], help="comma-separated: vit_s16,vit_b16")
    p.add_argument("--big", default="vit_h14", help="model for the apply/fold/ONNX-export rows ('' to skip)")
    p.add_argument("--skip-big-onnx", action="store_true", help="skip the big model's ONNX export (minutes, GBs)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads per worker")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for benchmark.{json,md,png}")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--quiet-load", type=float, default=None, help="before each task, wait until the 1-minute load average is below this")
    p.add_argument("--quiet-wait", type=float, default=300, help="give up waiting for --quiet-load after this many seconds")
    args = p.parse_args(argv)

    tasks = plan(args)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    for i, spec in enumerate(tasks, 1):
        label = " ".join(f"{v}" for k, v in spec.items() if k in ("task", "model", "variant"))
        if args.quiet_load is not None:
            waited = wait_quiet(args.quiet_load, args.quiet_wait)
            spec = {**spec, "waited_s": round(waited)} if waited else spec
        print(f"[{i}/{len(tasks)}] {label} (load {M.load()[0]})", file=sys.stderr, flush=True)
        result = run_task(spec, args.threads, args.timeout)
        if not result.get("ok"):
            print(f"    failed: {result.get('error')}", file=sys.stderr, flush=True)
        results.append(result)
    doc = {"command": command.strip(), "started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "environment": M.environment() | {"threads": args.threads}, "tasks": results}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_reports(doc, args.out)
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(v) for v in paths.values()), file=sys.stderr)
    return 0 if all(r.get("ok") for r in results) else 1
