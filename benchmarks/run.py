"""The benchmark's one command: `python -m benchmarks [--quick]`.

Runs every measurement in its own worker process (benchmarks/worker.py), then writes
`results/benchmark.json`, `results/benchmark.md` and `results/benchmark.png` (benchmarks/report.py).
The default run (ViT-S/16, ViT-B/16, ViT-H/14 apply/fold/ONNX) takes about 50 minutes on the 2
cores of the committed results (an hour and a half on the slower machine before); `--quick`
(ViT-S/16 only) took about 15 there. `--tasks` and `--append` take one run in parts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import measure as M
from benchmarks.report import write_reports

RESULTS = Path(__file__).parent / "results"
MAIN = ["full", "full_fwd_bwd", "linear_probe", "rlrr", "rlrr_eager", "lora_r8", "ssf"]
ABLATIONS = ["rlrr_compiled", "rlrr_linears", "rlrr_parametrize"]  # compiled kernels; like-for-like placement; without the recompute Function
SMALL = "vit_s16"
NO_MEMORY = {"full_fwd_bwd", "rlrr_eager", "rlrr_compiled"}  # same model and memory as "full" / "rlrr" (bar the optimizer state / compiled code)
#: What a missing optional package removes from a run (said in the report).
NEEDS = {"lora_r8": "peft", "onnx": "onnxruntime"}


def missing(name: str) -> str | None:
    """The optional package a variant or task needs and this environment lacks, if any."""
    package = NEEDS.get(name)
    return package if package and importlib.util.find_spec(package) is None else None


def plan(args: argparse.Namespace) -> list[dict]:
    """The task specs, in the order they run."""
    tasks = gpu_plan(args) if args.device == "cuda" or args.smoke else cpu_plan(args)
    out = []
    for spec in tasks:
        if missing(spec["task"]) or missing(spec.get("variant", "")) or (args.tasks and spec["task"] not in args.tasks):
            continue
        if "variants" in spec:
            spec = {**spec, "variants": [v for v in spec["variants"] if not missing(v)]}
        out.append(spec)
    return out


def cpu_plan(args: argparse.Namespace) -> list[dict]:
    """The default run: ViT-S/16 and ViT-B/16 at batch 8 on CPU, then ViT-H/14's apply and fold."""
    quick = args.quick
    models = ["vit_s16"] if quick else args.models
    tasks: list[dict] = []
    for model in models:
        small = model == SMALL  # the ablations and the longer inference series: on ViT-S/16 only, whatever part of a run this is
        variants = MAIN + (ABLATIONS if small else [])
        tasks.append({"task": "train_timing", "model": model, "variants": variants + ["dense_floor"], "rounds": 10, "warmup": 2})
        # the targets' ratios: three variants alone, rounds enough for a median good to about ±2 % (tasks.floor_ratio)
        tasks.append({"task": "floor_ratio", "model": model, "rounds": 16 if quick else (60 if small else 40), "warmup": 2})
        tasks.append({"task": "own_work", "model": model, "rounds": 6, "warmup": 2})
        tasks += [{"task": "train_memory", "model": model, "variant": v, "steps": 2} for v in variants if v not in NO_MEMORY]
        tasks.append({"task": "gemm_floor", "model": model, "rounds": 5, "warmup": 1})
        # one call varies by ±10 % here even when idle: ratios need a few dozen rounds to settle within ±3 %
        tasks.append({"task": "inference", "model": model, "rounds": 12 if quick else (24 if small else 14), "warmup": 2})
        tasks.append({"task": "onnx", "model": model, "rounds": 16 if quick else (30 if small else 20), "warmup": 2})
    if args.big and not quick:
        tasks.append({"task": "big_apply_fold", "model": args.big})
        if not args.skip_big_onnx:
            tasks.append({"task": "big_onnx", "model": args.big})
    return tasks


def gpu_plan(args: argparse.Namespace) -> list[dict]:
    """`--device cuda`: ViT-B/16, batch 64, bf16 autocast, in about 5 minutes; `--smoke`: the same tasks at CI size on any device."""
    smoke = args.smoke
    model, batch, amp = ("vit_t16_32", 2, "bfloat16") if smoke else ("vit_b16", 64, "bfloat16")
    rounds = 2 if smoke else 10
    setup = {"device": args.device, "batch": batch, "amp": amp}
    tasks = [{"task": "train_timing", "model": model, "variants": MAIN + ABLATIONS, "rounds": rounds, "warmup": 1 if smoke else 3, **setup}]
    tasks += [{"task": "train_memory", "model": model, "variant": v, "steps": 1 if smoke else 3, **setup} for v in ("full", "rlrr", "lora_r8")]
    tasks.append({"task": "inference", "model": model, "rounds": rounds if smoke else 20, "warmup": 1 if smoke else 3, **setup})
    tasks.append({"task": "onnx", "model": model, "rounds": rounds if smoke else 20, "warmup": 1 if smoke else 3, "batch": batch})
    return tasks


def wait_quiet(below: float, limit_s: float) -> float:
    """Sleep until the 1-minute load average drops below `below` (the machine is shared); seconds waited."""
    t = time.perf_counter()
    while M.load()[0] >= below and time.perf_counter() - t < limit_s:
        time.sleep(5)
    return time.perf_counter() - t


def run_task(spec: dict, threads: int, timeout: float, kernels: str | None, in_process: bool = False) -> dict:
    kwargs = {k: v for k, v in spec.items() if k != "waited_s"} | {"threads": threads, "kernels": kernels}
    if in_process:  # a functional check: memory figures then belong to the whole run
        from benchmarks.worker import run

        t = time.perf_counter()
        return {"spec": spec, **run(kwargs), "wall_s": time.perf_counter() - t}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(kwargs), str(out)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
            result = json.loads(out.read_text()) if out.exists() else {"ok": False, "error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}"}
        except subprocess.TimeoutExpired:
            result = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    return {"spec": spec, "wall_s": time.perf_counter() - t, **result}


def _key(result: dict) -> tuple:
    spec = result["spec"]
    return spec["task"], spec.get("model"), spec.get("variant")


def merge(old: dict, new: dict) -> dict:
    """One run made of parts (`--append`): every part's command and time span, the newest result of each task."""
    old.pop("analysis", None)
    if old["environment"] != new["environment"] or old.get("kernels") != new.get("kernels"):
        raise SystemExit("--append: the results in --out come from another machine or setting; use another --out")
    done = {_key(r) for r in new["tasks"]}
    return {**new, "command": f"{old['command']}; {new['command']}", "started": old["started"],
            "skipped": sorted(set(old["skipped"]) | set(new["skipped"])), "tasks": [r for r in old["tasks"] if _key(r) not in done] + new["tasks"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ViT-S/16 only, fewer rounds (about 15 minutes)")
    p.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=["vit_s16", "vit_b16"], help="comma-separated: vit_s16,vit_b16")
    p.add_argument("--big", default="vit_h14", help="model for the apply/fold/ONNX-export rows ('' to skip)")
    p.add_argument("--skip-big-onnx", action="store_true", help="skip the big model's ONNX export (minutes, GBs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: ViT-B/16 at batch 64 under bf16 autocast, training and latency, about 5 minutes")
    p.add_argument("--smoke", action="store_true", help="the --device run's tasks at CI size (ViT-Ti at 32², batch 2, 2 rounds)")
    p.add_argument("--kernels", default="inductor", help="torch.compile backend of the compiled-kernels ablation ('none': eager ops)")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads per worker (default: 2 on CPU, all on cuda)")
    p.add_argument("--out", type=Path, default=None, help="folder for benchmark.{json,md,png} (default: benchmarks/results, or results/<device> for --device cuda)")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=None,
                   help="comma-separated task names to run (train_timing,floor_ratio,own_work,train_memory,gemm_floor,inference,onnx,big_apply_fold,big_onnx)")
    p.add_argument("--append", action="store_true",
                   help="add to the results already in --out (a task run again replaces its earlier result): one run in parts")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--in-process", action="store_true", help="run the tasks in this process (a quick functional check; memory figures are then the run's)")
    p.add_argument("--quiet-load", type=float, default=None, help="before each task, wait until the 1-minute load average is below this")
    p.add_argument("--quiet-wait", type=float, default=300, help="give up waiting for --quiet-load after this many seconds")
    args = p.parse_args(argv)
    from benchmarks.tasks import TASKS  # reason: the names a run may ask for; heavy imports, after --help
    from benchmarks.variants import MODELS

    for option, given, known in (("--tasks", args.tasks or [], TASKS), ("--models", args.models, MODELS), ("--big", [args.big] if args.big else [], MODELS)):
        unknown = [name for name in given if name not in known]
        if unknown:  # a typo must not run nothing and overwrite the results in --out
            p.error(f"{option}: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    threads = args.threads or (2 if args.device == "cpu" else os.cpu_count())
    kernels = None if args.kernels == "none" else args.kernels
    out = args.out or (RESULTS if args.device == "cpu" else RESULTS / args.device)

    tasks = plan(args)
    if not tasks:  # (e.g. --models '' with a per-model task): nothing to measure, so nothing is written
        print("python -m benchmarks: these options select no task; nothing run, nothing written", file=sys.stderr)
        return 2
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    environment = M.environment(torch.device(args.device)) | {"threads": threads}
    print(f"machine: {M.machine_line(environment)}", file=sys.stderr, flush=True)
    results = []
    for i, spec in enumerate(tasks, 1):
        label = " ".join(f"{v}" for k, v in spec.items() if k in ("task", "model", "variant"))
        if args.quiet_load is not None:
            waited = wait_quiet(args.quiet_load, args.quiet_wait)
            spec = {**spec, "waited_s": round(waited)} if waited else spec
        print(f"[{i}/{len(tasks)}] {label} (load {M.load()[0]})", file=sys.stderr, flush=True)
        result = run_task(spec, threads, args.timeout, kernels, args.in_process)
        if not result.get("ok"):
            print(f"    failed: {result.get('error')}", file=sys.stderr, flush=True)
        results.append(result)
    skipped = sorted({f"{n} ({missing(n)} not installed)" for n in [*MAIN, *NEEDS] if missing(n)})
    doc = {"command": command.strip(), "started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "environment": environment, "kernels": kernels, "skipped": skipped, "tasks": results}
    out.mkdir(parents=True, exist_ok=True)
    if args.append and (out / "benchmark.json").exists():
        doc = merge(json.loads((out / "benchmark.json").read_text()), doc)
    paths = write_reports(doc, out)
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(v) for v in paths.values()), file=sys.stderr)
    return 0 if all(r.get("ok") for r in results) else 1
