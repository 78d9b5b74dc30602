"""The results: one JSON document other tools read, the Markdown tables and the plot, all from it.

JSON shape (kept stable for other tools):
`{"tasks": {TASK: {"data": str, "classes": int, "train": int, "test": int,
  "methods": {METHOD: {"trainable_params": int, "accuracy": [per seed], "onnx_accuracy": [per seed, RLRR rows only]}}}}}`
plus, beside those keys, what was run (backbone, protocol, lr chosen and swept, wall times, load).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.transfer import backbone
from benchmarks.transfer.methods import METHODS

FORMAT = "rlrr.transfer/1"


def document(raw: dict, command: str) -> dict:
    """The results document from `run.benchmark`'s raw results."""
    settings = raw["settings"]
    doc = {
        "format": FORMAT,
        "command": command,
        "backbone": {k: v for k, v in raw["backbone"].items() if k not in ("file", "cached")},
        "protocol": {
            "epochs": settings["epochs"], "batch_size": settings["batch_size"], "weight_decay": settings["weight_decay"],
            "seeds": list(settings["seeds"]), "schedule": "AdamW, cosine to 1e-8, linear warm-up of min(10, epochs/10) epochs (finetune's recipe)",
            "sweep": {m: list(METHODS[m].lrs) for m in settings["methods"] if METHODS[m].lrs},
            "follows": {m: METHODS[m].lr_from for m in settings["methods"] if METHODS[m].lr_from},
            "selection": "sweep: seed 0, train 800 / val 200, val accuracy after the last epoch (lower lr on a tie); "
                         "final: train+val 1,000, test accuracy after the last epoch",
        },
        "run": {"wall_s": raw["wall_s"], "cpus": raw["cpus"], "jobs": settings["jobs"], "backbone_cached": raw["backbone"].get("cached", False),
                "load_1min": {"min": min(raw["loads"]), "mean": round(statistics.mean(raw["loads"]), 2), "max": max(raw["loads"])}},
        "tasks": {},
    }
    for task in settings["tasks"]:
        info = raw["data"][task]
        methods = {}
        for m in settings["methods"]:
            runs = sorted((r for r in raw["final"] if r["task"] == task and r["method"] == m), key=lambda r: r["seed"])
            sweep = {f"{r['lr']:g}": r["acc"] for r in raw["sweep"] if r["task"] == task and r["method"] == m}
            row = {"label": METHODS[m].label, "trainable_params": max(r["trainable_params"] or 0 for r in runs), "accuracy": [r["acc"] for r in runs],
                   "seeds": [r["seed"] for r in runs], "lr": raw["chosen"][task][m], "sweep_val_accuracy": sweep,
                   "wall_s": [r["wall_s"] for r in runs]}
            diverged = [f"{r['phase']} lr {r['lr']:g} seed {r['seed']}" for r in raw["sweep"] + raw["final"]
                        if r["task"] == task and r["method"] == m and r.get("diverged")]
            if diverged:
                row["diverged"] = diverged  # scored 0
            if METHODS[m].exports:
                runs = [r if "onnx_acc" in r else {**r, "onnx_acc": 0.0, "torch_acc": 0.0, "same_predictions": 0, "export_s": 0.0,
                                                   "export": {"max_rel_error": None}} for r in runs]  # a diverged run has no export
                row["onnx_accuracy"] = [r["onnx_acc"] for r in runs]
                row["onnx_same_predictions"] = [r["same_predictions"] for r in runs]
                row["torch_accuracy_recomputed"] = [r["torch_acc"] for r in runs]
                row["export_max_rel_error"] = [r["export"]["max_rel_error"] for r in runs]  # export.onnx's own check, random inputs
                row["export_s"] = [r["export_s"] for r in runs]
            methods[m] = row
        counts = info["counts"]
        doc["tasks"][task] = {"data": info["data"], "classes": len(info["classes"]), "train": counts["train"] + counts["val"],
                              "test": counts["test"], "flip": info["flip"], "digest": info["digest"], "methods": methods}
    return doc


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def task_mean(doc: dict, method: str) -> list[float]:
    """Per seed, the accuracy averaged over the tasks (the paper's "Mean" column, per seed)."""
    rows = [t["methods"][method] for t in doc["tasks"].values()]
    return [statistics.mean(r["accuracy"][i] for r in rows) for i in range(min(len(r["accuracy"]) for r in rows))]


def summary_table(doc: dict) -> str:
    """Per method: test accuracy (mean ± std over seeds, %) per task and averaged over tasks,
    trainable parameters (the head's size differs by task), seconds per run."""
    tasks = list(doc["tasks"])
    methods = list(next(iter(doc["tasks"].values()))["methods"])
    head = "| method | " + " | ".join(tasks) + " | mean | trainable params | s / run |"
    lines = [head, "|---|" + "---|" * len(tasks) + "---|---|---|"]
    for m in methods:
        rows = [doc["tasks"][t]["methods"][m] for t in tasks]
        low, high = min(r["trainable_params"] for r in rows), max(r["trainable_params"] for r in rows)
        shown = _params(low) if low == high else f"{_params(low)[:-2]}-{_params(high)}"
        wall = statistics.mean(w for r in rows for w in r["wall_s"])
        lines.append(f"| {rows[0]['label']} | " + " | ".join(_pct(r["accuracy"]) for r in rows)
                     + f" | {_pct(task_mean(doc, m))} | {shown} | {wall:.0f} |")
    return "\n".join(lines)


def task_tables(doc: dict) -> str:
    out = []
    for task, t in doc["tasks"].items():
        out += [f"### {task}: {t['classes']} classes, {t['train']} training / {t['test']} test images", "", t["data"], "",
                "| method | test accuracy % | per seed | lr (swept: val accuracy) | trainable params | s / run | onnxruntime % (same predictions) |",
                "|---|---|---|---|---|---|---|"]
        for m, r in t["methods"].items():
            seeds = ", ".join(f"{100 * a:.1f}" for a in r["accuracy"])
            sweep = ", ".join(f"{lr}: {100 * a:.1f}" for lr, a in r["sweep_val_accuracy"].items()) or "as " + doc["protocol"]["follows"].get(m, "-")
            onnx = "-"
            if "onnx_accuracy" in r:
                same = ", ".join(f"{s}/{t['test']}" for s in r["onnx_same_predictions"])
                onnx = f"{_pct(r['onnx_accuracy'])} ({same})"
            lines = f"| {r['label']} | {_pct(r['accuracy'])} | {seeds} | {r['lr']:g} ({sweep}) | {r['trainable_params']:,} | {statistics.mean(r['wall_s']):.0f} | {onnx} |"
            out.append(lines)
        out.append("")
    return "\n".join(out)


def markdown(doc: dict) -> str:
    b, run, p = doc["backbone"], doc["run"], doc["protocol"]
    load = run["load_1min"]
    arch = b["arch"]
    swept = any(r["sweep_val_accuracy"] for t in doc["tasks"].values() for r in t["methods"].values())
    selection = p["selection"] if swept else "Learning rates: the full run's choices (not swept here); test accuracy after the last epoch"
    shape = f"patch {arch['patch_size']}, width {arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads"
    return "\n".join([
        "# Transfer benchmark: RLRR against LoRA, SSF, linear probing and full fine-tuning",
        "",
        f"`{doc['command']}`. Backbone: {b['preset']} ({shape}) at {b['img_size']} px ({b['params']:,} parameters), pretrained "
        f"from scratch on {b['source']['data']} ({b['source']['train']:,} images): source val accuracy "
        f"{100 * b['source']['val_acc']:.1f} % after {b['recipe']['epochs']} epochs, {b['pretrain_s']:.0f} s. "
        f"Each method: {p['epochs']} epochs, batch {p['batch_size']}, weight decay {p['weight_decay']:g}, {p['schedule']}; "
        f"seeds {p['seeds']}. {selection}.",
        "",
        f"Run: {run['wall_s'] / 60:.1f} min wall on {run['cpus']} CPU cores, {run['jobs']} single-threaded workers "
        f"(backbone {'cached' if run['backbone_cached'] else 'pretrained in this run'}); 1-minute load average "
        f"{load['min']:.1f}-{load['max']:.1f} (mean {load['mean']:.1f}): wall times (s / run, one core each) include other processes' load.",
        "",
        "## Summary (test accuracy %, mean ± std over seeds)",
        "",
        summary_table(doc),
        "",
        "## Per task",
        "",
        task_tables(doc),
    ])


def plot(doc: dict, path: Path) -> None:
    """Accuracy against trainable parameters (log scale), one panel per task: the paper's Fig. 1 in miniature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(doc["tasks"])
    methods = list(doc["tasks"][tasks[0]]["methods"])
    panels = [(f"{t} ({doc['tasks'][t]['train']} train)", {m: (doc["tasks"][t]["methods"][m]["trainable_params"],
                                                             doc["tasks"][t]["methods"][m]["accuracy"]) for m in methods}) for t in tasks]
    panels.append(("mean over the tasks", {m: (statistics.mean(doc["tasks"][t]["methods"][m]["trainable_params"] for t in tasks),
                                               task_mean(doc, m)) for m in methods}))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.8), squeeze=False)
    colours = {"rlrr": "tab:red", "rlrr_r4": "tab:pink", "lora": "tab:blue", "ssf": "tab:green", "linear": "tab:gray", "full": "black"}
    for ax, (title, points) in zip(axes[0], panels):
        for m, (params, accuracy) in points.items():
            mean, std = mean_std(accuracy)
            ax.errorbar(params, 100 * mean, yerr=100 * std, fmt="*" if m.startswith("rlrr") else "o",
                        markersize=12 if m == "rlrr" else 7, color=colours.get(m, None), capsize=3,
                        label=doc["tasks"][tasks[0]]["methods"][m]["label"])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Transfer from a fractal-pretrained ViT ({backbone.IMG_SIZE} px): accuracy vs trainable parameters, "
                 f"mean ± std over {len(doc['protocol']['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict, out: Path, stem: str = "transfer", picture: bool = True) -> list[Path]:
    """`out/<stem>.json`, `.md` and (with `picture`) `.png`."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{stem}.json", out / f"{stem}.md"]
    files[0].write_text(json.dumps(doc, indent=1) + "\n")
    files[1].write_text(markdown(doc))
    if picture:
        files.append(out / f"{stem}.png")
        plot(doc, files[2])
    return files


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":  # python -m benchmarks.transfer.report [RESULTS.json]: the tables and plot again from the JSON
    import sys

    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "results" / "transfer.json"
    written = write(json.loads(source.read_text()), source.parent, stem=source.stem, picture=source.stem == "transfer")
    print("\n".join(str(f) for f in written[1:]))
