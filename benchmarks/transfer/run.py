"""Run the transfer benchmark: learning-rate sweep, seeds, exports; every run through `finetune`.

Phase 1 (sweep): each swept method at each of its learning rates, seed 0, trained on train (800)
and scored on val (200) after the last epoch; the best lr per task and method is kept.
Phase 2 (final): every method at its lr, each seed, trained on train+val (1,000) and scored on
the test split after the last epoch (never the best epoch on test). RLRR runs are then folded,
exported with `python -m export.onnx` and run in onnxruntime on the same test tensors.

Runs go to a pool of single-threaded worker processes (`jobs`, default 2): a small model runs
best on one thread per core, and each run then repeats bit for bit whatever the machine's cores.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.transfer import backbone, tasks
from benchmarks.transfer.methods import METHODS

Log = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """What one invocation runs: the same schedule for every method of a task."""

    tasks: tuple[str, ...] = tuple(tasks.TASKS)
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10
    batch_size: int = 32  # the official configs' batch
    weight_decay: float = 5e-5  # the official scripts' default, every method
    jobs: int = 2
    lrs: dict[str, dict[str, float]] = field(default_factory=dict)  # {task: {method: lr}} given: no sweep for those
    pretraining: backbone.Pretraining = backbone.Pretraining()
    sizes: dict[str, int] | None = None  # smaller splits of the generated tasks (tests); None: VTAB-1k's


@dataclass(frozen=True)
class Job:
    """One fine-tuning run (and, for RLRR in the final phase, its export)."""

    phase: str  # "sweep" or "final"
    task: str
    method: str
    lr: float
    seed: int
    data: str
    weights: str
    output: str
    epochs: int
    batch_size: int
    weight_decay: float
    flip: bool
    export: bool

    def cost(self) -> float:  # for scheduling the longest runs first
        return (0.4 if self.method == "linear" else 1.0) * (1.25 if self.phase == "final" else 1.0) + (0.5 if self.export else 0.0)


def train(job: Job) -> dict:
    """Run one job in this process (a pool worker): fine-tune, score, and export RLRR."""
    import torch

    from benchmarks.transfer import deploy
    from finetune import DivergedError, FinetuneConfig, finetune

    torch.set_num_threads(1)
    method = METHODS[job.method]
    config = FinetuneConfig(preset=backbone.PRESET, model_kwargs=dict(backbone.ARCH), img_size=backbone.IMG_SIZE, weights=job.weights,
                            rank=method.rank, data=job.data, protocol="tune" if job.phase == "sweep" else "final",
                            epochs=job.epochs, lr=job.lr, weight_decay=job.weight_decay, batch_size=job.batch_size, flip=job.flip,
                            workers=0, seed=job.seed, output=job.output, force=True, progress="none", evaluate_test=False,
                            keep_checkpoints=1)
    start = time.perf_counter()
    try:
        result = finetune(config, adapt=method.adapt)
    except DivergedError as e:  # a learning rate too high for this method: it scores nothing, the benchmark goes on
        return {**asdict(job), "acc": 0.0, "diverged": str(e), "curve": [], "wall_s": round(time.perf_counter() - start, 1),
                "trainable_params": None, "file": None}
    seconds = time.perf_counter() - start
    out = {**asdict(job), "acc": result.history[-1]["val_acc"], "curve": [round(r["val_acc"], 4) for r in result.history],
           "wall_s": round(seconds, 1), "trainable_params": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
           "file": str(result.files["last"])}
    if job.export:
        x, y = deploy.test_tensors(Path(job.data), backbone.IMG_SIZE, result.eval_transform)
        ours = deploy.torch_predictions(result.model, x)
        onnx_file = Path(job.output) / "model.onnx"
        start = time.perf_counter()
        exported = deploy.export_onnx(result.files["last"], Path(job.weights), onnx_file)
        theirs = deploy.onnx_predictions(onnx_file, x)
        out.update(torch_acc=float((ours == y).mean()), onnx_acc=float((theirs == y).mean()), same_predictions=int((ours == theirs).sum()),
                   test_images=len(y), export=exported, export_s=round(time.perf_counter() - start, 1))
        onnx_file.unlink(missing_ok=True)
    return out


def run_jobs(jobs: list[Job], workers: int, log: Log, loads: list[float]) -> list[dict]:
    """The jobs on a pool of `workers` processes, longest first; results in the jobs' order."""
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost())
    results: list[dict | None] = [None] * len(jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_quiet_worker) as pool:
        futures = {pool.submit(train, jobs[i]): i for i in order}
        for n, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            results[i] = r = future.result()
            loads.append(os.getloadavg()[0])
            extra = f", onnxruntime {r['onnx_acc']:.1%} ({r['same_predictions']}/{r['test_images']} same predictions)" if "onnx_acc" in r else ""
            extra += " (DIVERGED: scored 0)" if r.get("diverged") else ""
            log(f"  [{n}/{len(jobs)}] {r['phase']} {r['task']} {r['method']} lr {r['lr']:g} seed {r['seed']}: "
                f"{'val' if r['phase'] == 'sweep' else 'test'} {r['acc']:.1%}{extra} ({r['wall_s']:.0f} s)")
    return results  # type: ignore[return-value]


def _quiet_worker() -> None:
    import warnings

    warnings.filterwarnings("ignore")  # zoo's notes (head left fresh) and library deprecations: the loop reports what matters


def benchmark(settings: Settings, cache: Path, log: Log = print) -> dict:
    """Backbone, data, sweep, final runs; the raw results (see `report.document` for the JSON)."""
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    record = backbone.ensure(cache, settings.pretraining, log=log)
    weights = str(Path(record["file"]))
    data = {}
    for name in settings.tasks:
        manifest = tasks.ensure_imagefolder(name, cache / "data" / name, sizes=settings.sizes)
        data[name] = {"dir": str(cache / "data" / name), **manifest}
    runs = cache / "runs"

    def job(phase: str, task: str, method: str, lr: float, seed: int) -> Job:
        tag = f"lr{lr:g}" if phase == "sweep" else f"seed{seed}"
        return Job(phase, task, method, lr, seed, data[task]["dir"], weights, str(runs / task / method / f"{phase}-{tag}"),
                   settings.epochs, settings.batch_size, settings.weight_decay, data[task]["flip"],
                   phase == "final" and METHODS[method].exports)

    sweep_jobs = [job("sweep", t, m, lr, 0) for t in settings.tasks for m in settings.methods
                  if m not in settings.lrs.get(t, {}) for lr in METHODS[m].lrs]
    if sweep_jobs:
        log(f"sweep: {len(sweep_jobs)} runs (seed 0, trained on train, scored on val), {settings.jobs} workers")
    sweep = run_jobs(sweep_jobs, settings.jobs, log, loads)
    chosen = choose_lrs(settings, sweep)
    final_jobs = [job("final", t, m, chosen[t][m], s) for t in settings.tasks for m in settings.methods for s in settings.seeds]
    log(f"final: {len(final_jobs)} runs (trained on train+val, scored on test), seeds {list(settings.seeds)}, {settings.jobs} workers")
    final = run_jobs(final_jobs, settings.jobs, log, loads)
    loads.append(os.getloadavg()[0])
    return {"settings": asdict(settings), "backbone": record, "data": data, "chosen": chosen, "sweep": sweep, "final": final,
            "wall_s": round(time.perf_counter() - start, 1), "loads": loads, "cpus": os.cpu_count()}


def choose_lrs(settings: Settings, sweep: list[dict]) -> dict[str, dict[str, float]]:
    """Per task and method: the given lr, else the swept lr with the best val accuracy (the lower on a tie),
    else (a row that is not swept) the lr chosen for the row it follows."""
    chosen: dict[str, dict[str, float]] = {}
    for t in settings.tasks:
        chosen[t] = dict(settings.lrs.get(t, {}))
        for m in settings.methods:
            runs = sorted((r for r in sweep if r["task"] == t and r["method"] == m), key=lambda r: (-r["acc"], r["lr"]))
            if m not in chosen[t] and runs:
                chosen[t][m] = runs[0]["lr"]
        for m in settings.methods:
            if m not in chosen[t]:
                follows = METHODS[m].lr_from
                if follows not in chosen[t]:
                    raise ValueError(f"{m} takes the lr chosen for {follows}, which is not run")
                chosen[t][m] = chosen[t][follows]
    return chosen


def keep_files(raw: dict, dest: Path) -> dict[str, dict[str, str]]:
    """Per task: the best seed's RLRR adapter (`rlrr_best.safetensors`) and linear-probe head
    (`linear_head.safetensors`) copied to `dest/<task>/`, for work that builds on them (INT8 export)."""
    import shutil

    kept: dict[str, dict[str, str]] = {}
    for task in raw["settings"]["tasks"]:
        kept[task] = {}
        for method, name in (("rlrr", "rlrr_best.safetensors"), ("linear", "linear_head.safetensors")):
            runs = [r for r in raw["final"] if r["task"] == task and r["method"] == method and r["file"]]
            if not runs:
                continue
            best = sorted(runs, key=lambda r: (-r["acc"], r["seed"]))[0]
            (dest / task).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(best["file"], dest / task / name)
            kept[task][name] = f"seed {best['seed']}, test accuracy {best['acc']:.4f}"
    return kept
