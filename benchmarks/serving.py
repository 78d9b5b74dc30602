"""Serving many tasks from one base model: `python -m benchmarks serving` (or `python -m benchmarks.serving`).

ViT-S/16 at 224², random base weights and 16 random adapter files (the ViT placement, rank 1,
heads of 10 to 397 classes), exported by `export.export_multitask` and `export.export_onnx`, run
in onnxruntime (CPU) side by side in one process, interleaved round by round:

- the folded single-task model (the base graph) at batch 1, 4 and 16;
- the routed file for K = 1, 4 and 16 tasks, a mixed batch of 16 (row n is task n mod K);
- the adapter-inputs base file with one task's `.onnx_adapter` active, at batch 1, 4 and 16.

Ratios are taken within a round, then the median over rounds. Sizes and the weight bytes a
server holds are counted from the tensors (ONNX initializers, `.onnx_adapter` parameters), not
process memory. Writes `results/serving.{json,md,png}`; `python -m benchmarks.serving --report
results/serving.json` rewrites the table and the chart from the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import measure as M

RESULTS = Path(__file__).parent / "results"
PRESET = "vit_small_patch16_224"
CLASSES = (100, 37, 102, 47, 200, 196, 10, 397)  # CIFAR-100, Pets, Flowers, DTD, CUB, Cars, EuroSAT, SUN397: cycled
KS = (1, 4, 16)
BATCHES = (1, 4, 16)
BATCH = 16


# --- building the files ---------------------------------------------------------------------------


def make_files(folder: Path, k: int, seed: int = 0, tiny: bool = False, preset: str = PRESET) -> tuple[Path, list[Path]]:
    """Base weights and `k` random adapter files (non-zero adapters, random heads) of a zoo preset."""
    import torch
    from torch import nn
    from safetensors.torch import save_file

    import rlrr
    import zoo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        plain = zoo.build_base(preset, CLASSES[0], tiny=tiny)
        model = zoo.build(preset, num_classes=CLASSES[0], tiny=tiny)
    base = folder / "base.safetensors"
    save_file({n: t.contiguous() for n, t in plain.state_dict().items()}, str(base))
    del plain
    g = torch.Generator().manual_seed(seed)
    head_name = zoo.classifier_name(model)
    paths = []
    for i in range(k):
        classes = CLASSES[i % len(CLASSES)]
        head = model.get_submodule(head_name)
        model.set_submodule(head_name, nn.Linear(head.in_features, classes))  # this task's head, trained in full
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_((1.0 if name.endswith("rlrr_scale") else 0.0) + torch.randn(p.shape, generator=g) * (0.1 if "rlrr_" in name else 0.02))
        path = folder / f"task{i}.safetensors"
        meta = zoo.adapter_metadata(preset, num_classes=classes, tiny=tiny)
        rlrr.save_adapter(model, path, metadata={**meta, "task": f"task{i}"})
        paths.append(path)
    return base, paths


def export_all(folder: Path, base: Path, adapters: list[Path], img: int) -> dict:
    """The folded single-task file, routed files for each K, and the adapter-inputs file with its adapters."""
    import export
    import rlrr

    quiet = {"verify": False, "latency_runs": 0}
    files = {"folded": folder / "folded.onnx", "adapter_inputs": folder / "inputs.onnx"}
    meta = rlrr.read_adapter_file(adapters[0]).metadata  # the zoo's record: model, twin, builder arguments
    spec = export.ModelSpec(meta["model"], num_classes=CLASSES[0], img_size=img, weights=base, preset=PRESET, tiny=meta.get("tiny", False),
                            model_kwargs=meta.get("model_kwargs", {}))
    export.export_onnx(spec, files["folded"], adapter=adapters[0], **quiet)
    for k in KS:
        files[f"routed{k}"] = folder / f"routed{k}.onnx"
        export.export_multitask(adapters[:k], files[f"routed{k}"], weights=base, **quiet)
    report = export.export_multitask(adapters, files["adapter_inputs"], weights=base, adapter_inputs=True, **quiet)
    files["onnx_adapters"] = [Path(t.onnx_adapter) for t in report.tasks]
    return files


# --- measuring --------------------------------------------------------------------------------


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of every initializer (the weights a session holds), external data included."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def adapter_bytes(path: Path) -> tuple[int, int]:
    """(adapter tensors, head tensors) bytes of an `.onnx_adapter` file."""
    import onnxruntime as ort

    params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    sizes = {k: v.numpy().nbytes for k, v in params.items()}
    return sum(v for k, v in sizes.items() if not k.startswith("trained.")), sum(v for k, v in sizes.items() if k.startswith("trained."))


def sizes(files: dict, adapters: list[Path]) -> dict:
    import rlrr

    per_task = []
    for path in adapters:
        state = rlrr.read_adapter_file(path)
        per_task.append({"adapter": sum(4 * t.numel() for t in state.tensors.values()), "head": sum(4 * t.numel() for t in state.trained.values())})
    out = {
        "folded_file": files["folded"].stat().st_size, "folded_weights": onnx_weight_bytes(files["folded"]), "tasks": per_task,
        "adapter_inputs_file": files["adapter_inputs"].stat().st_size, "adapter_inputs_weights": onnx_weight_bytes(files["adapter_inputs"]),
        "onnx_adapters": [dict(zip(("adapter", "head"), adapter_bytes(p)), file=p.stat().st_size) for p in files["onnx_adapters"]],
    }
    for k in KS:
        out[f"routed{k}_file"] = files[f"routed{k}"].stat().st_size
        out[f"routed{k}_weights"] = onnx_weight_bytes(files[f"routed{k}"])
    return out


def timings(files: dict, threads: int, rounds: int, warmup: int, img: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3

    def session(path: Path):
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal((b, 3, img, img)).astype(np.float32) for b in BATCHES}
    folded, inputs = session(files["folded"]), session(files["adapter_inputs"])
    adapter = ort.LoraAdapter()
    adapter.Load(str(files["onnx_adapters"][0]))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    fns = {}
    for b in BATCHES:
        fns[f"folded@{b}"] = lambda b=b: folded.run(None, {"input": xs[b]})
        fns[f"adapter_inputs@{b}"] = lambda b=b: inputs.run(None, {"input": xs[b]}, run_options)
    for k in KS:
        routed = session(files[f"routed{k}"])
        task = (np.arange(BATCH) % k).astype(np.int64)
        fns[f"routed{k}@{BATCH}"] = lambda s=routed, t=task: s.run(None, {"input": xs[BATCH], "task": t})
    load_before = M.load()
    raw = M.interleaved(fns, rounds, warmup, torch.device("cpu"))
    return {"rounds": rounds, "warmup": warmup, "threads": threads, "load": [load_before, M.load()], "wall": {n: r["wall"] for n, r in raw.items()}}


# --- the report ---------------------------------------------------------------------------------


def zoo_img(tiny: bool) -> int:
    import zoo

    preset = zoo.get_preset(PRESET)
    return preset.tiny.img_size if tiny else preset.img_size


def analyse(doc: dict) -> dict:
    """Latencies, ratios, sizes and the targets, from the raw results."""
    wall, s = doc["timing"]["wall"], doc["sizes"]
    med = {n: M.median(v) for n, v in wall.items()}
    folded = f"folded@{BATCH}"
    ratio = {f"routed{k}": M.paired_ratio(wall[f"routed{k}@{BATCH}"], wall[folded]) for k in KS}
    ratio["adapter_inputs"] = M.paired_ratio(wall[f"adapter_inputs@{BATCH}"], wall[folded])
    flat = {k: M.paired_ratio(wall[f"routed{k}@{BATCH}"], wall[f"routed1@{BATCH}"]) for k in KS}
    tasks = s["tasks"]
    base_file, base_weights = s["folded_file"], s["folded_weights"]
    a_h = [t["adapter"] + t["head"] for t in tasks]
    budget_file = {k: (base_file + sum(a_h[:k])) * 1.05 for k in KS}
    budget_weights = (base_weights + sum(a_h)) * 1.05
    server = {"routed": s[f"routed{KS[-1]}_weights"],
              "adapter_inputs": s["adapter_inputs_weights"] + sum(a["adapter"] + a["head"] for a in s["onnx_adapters"]),
              "folded_models": len(tasks) * base_weights, "budget": budget_weights}
    worst_adapter = max(a["adapter"] for a in s["onnx_adapters"]) / base_weights
    # K separate models serving a mixed batch of 16: K runs of 16/K rows each
    separate = {k: {"folded": k * med[f"folded@{BATCH // k}"], "adapter_inputs": k * med[f"adapter_inputs@{BATCH // k}"],
                    "routed": med[f"routed{k}@{BATCH}"]} for k in KS}
    memory = {k: {"routed": s[f"routed{k}_weights"], "folded": k * base_weights,
                  "adapter_inputs": s["adapter_inputs_weights"] + sum(a["adapter"] + a["head"] for a in s["onnx_adapters"][:k])} for k in KS}
    targets = []

    def target(what, value, bound, met, detail=""):
        targets.append({"target": what, "measured": value, "bound": bound, "met": bool(met), "detail": detail})

    r4 = ratio["routed4"]
    target("mixed batch of 16 over K = 4 tasks, routed / folded (batch 16)", r4["median"], "≤ 2.2", r4["median"] <= 2.2, _range(r4))
    spread = max(abs(flat[k]["median"] - 1) for k in KS)
    target("routed latency flat in K: largest deviation of routed K / routed 1 from 1, K = 1, 4, 16", spread, "≤ 0.10", spread <= 0.10,
           ", ".join(f"K={k}: {flat[k]['median']:.3f}" for k in KS))
    ra = ratio["adapter_inputs"]
    target("per-run adapter (--adapter-inputs), one task active / folded (batch 16)", ra["median"], "≤ 1.15", ra["median"] <= 1.15, _range(ra))
    for k in KS[1:]:
        target(f"routed file, K = {k}: size / (base export + K × (adapter + head))", s[f"routed{k}_file"] / (budget_file[k] / 1.05), "≤ 1.05",
               s[f"routed{k}_file"] <= budget_file[k], f"{_mb(s[f'routed{k}_file'])} vs {_mb(base_file)} + {_mb(sum(a_h[:k]))}")
    target(".onnx_adapter without its head / base weights (worst task)", worst_adapter, "≤ 0.01", worst_adapter <= 0.01,
           f"adapter {_kb(max(a['adapter'] for a in s['onnx_adapters']))}, heads {_kb(min(a['head'] for a in s['onnx_adapters']))}"
           f"–{_kb(max(a['head'] for a in s['onnx_adapters']))}, base {_mb(base_weights)}")
    for how in ("routed", "adapter_inputs"):
        target(f"weight bytes a server holds for K = {len(tasks)} ({how}) / (base + K × (adapter + head))", server[how] / (budget_weights / 1.05),
               "≤ 1.05", server[how] <= budget_weights, f"{_mb(server[how])}; {len(tasks)} folded models: {_mb(server['folded_models'])} "
               f"({server[how] / server['folded_models']:.3f}×)")
    return {"median_ms": {n: 1000 * v for n, v in med.items()}, "ratio": ratio, "flat": flat, "server": server, "separate": separate,
            "memory": memory, "targets": targets}


def _range(r: dict) -> str:
    return f"{r['median']:.3f} [{r['min']:.2f}–{r['max']:.2f}], {r['n']} rounds"


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _kb(n: float) -> str:
    return f"{n / 2**10:.0f} KiB"


def markdown(doc: dict, a: dict) -> str:
    t = doc["timing"]
    lines = [
        "# Serving many tasks from one base model",
        "",
        f"`{doc['command']}`, {doc['started']} → {doc['finished']}; onnxruntime {doc['environment'].get('onnxruntime')} CPU, "
        f"{t['threads']} threads on {doc['environment']['cores']} cores, load {t['load'][0][0]}→{t['load'][1][0]}. "
        f"ViT-S/16, 224², fp32, random weights; {len(doc['sizes']['tasks'])} random rank-1 adapters (ViT placement) with heads of "
        f"{min(CLASSES)}–{max(CLASSES)} classes. Medians over {t['rounds']} interleaved rounds after {t['warmup']} warm-up; ratios "
        "are the median [min–max] of per-round ratios.",
        "",
        "## Targets",
        "",
        "| target | measured | bound | met | detail |",
        "|---|---|---|---|---|",
    ]
    for x in a["targets"]:
        lines.append(f"| {x['target']} | {x['measured']:.3f} | {x['bound']} | {'yes' if x['met'] else '**no**'} | {x['detail']} |")
    lines += ["", f"## Latency, batch {BATCH} (ms)", "", "| model | median ms | × folded |", "|---|---:|---|",
              f"| folded single-task model | {a['median_ms'][f'folded@{BATCH}']:.1f} | 1 |"]
    for k in KS:
        lines.append(f"| routed, K = {k}, mixed batch | {a['median_ms'][f'routed{k}@{BATCH}']:.1f} | {_range(a['ratio'][f'routed{k}'])} |")
    lines.append(f"| adapter inputs, one task active | {a['median_ms'][f'adapter_inputs@{BATCH}']:.1f} | {_range(a['ratio']['adapter_inputs'])} |")
    lines += ["", f"## A mixed batch of {BATCH} over K tasks, and the weights held", "",
              "| K | routed ms | K folded models ms (K runs of 16/K) | adapter inputs ms (K runs) | routed MiB | adapter inputs MiB | K folded models MiB |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for k in KS:
        sep, mem = a["separate"][k] if k in a["separate"] else a["separate"][str(k)], a["memory"][k] if k in a["memory"] else a["memory"][str(k)]
        lines.append(f"| {k} | {1000 * sep['routed']:.0f} | {1000 * sep['folded']:.0f} | {1000 * sep['adapter_inputs']:.0f} | "
                     f"{mem['routed'] / 2**20:.1f} | {mem['adapter_inputs'] / 2**20:.1f} | {mem['folded'] / 2**20:.1f} |")
    s = doc["sizes"]
    lines += ["", "## Files", "", f"- folded single-task export: {_mb(s['folded_file'])} ({_mb(s['folded_weights'])} of weights)"]
    for k in KS:
        lines.append(f"- routed, K = {k}: {_mb(s[f'routed{k}_file'])} ({_mb(s[f'routed{k}_weights'])} of weights)")
    lines.append(f"- adapter-inputs base file: {_mb(s['adapter_inputs_file'])}; each `.onnx_adapter` "
                 f"{_kb(min(x['file'] for x in s['onnx_adapters']))}–{_kb(max(x['file'] for x in s['onnx_adapters']))} "
                 f"(adapter {_kb(s['onnx_adapters'][0]['adapter'])} + head {_kb(min(x['head'] for x in s['onnx_adapters']))}–"
                 f"{_kb(max(x['head'] for x in s['onnx_adapters']))})")
    return "\n".join(lines) + "\n"


def chart(doc: dict, a: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(KS)
    get = lambda table, k, key: (table[k] if k in table else table[str(k)])[key]  # noqa: E731 (JSON keys are strings)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("routed", "one routed file (mixed batch)", "o-"), ("folded", "K folded models (K runs)", "s--"),
                              ("adapter_inputs", "adapter inputs (K runs, one adapter each)", "^:")):
        left.plot(ks, [1000 * get(a["separate"], k, key) for k in ks], style, label=label)
        right.plot(ks, [get(a["memory"], k, key) / 2**20 for k in ks], style, label=label)
    left.set(xscale="log", xticks=ks, xticklabels=ks, xlabel="tasks K", ylabel=f"ms for a batch of {BATCH}", title="latency, ViT-S/16, onnxruntime CPU")
    right.set(xscale="log", xticks=ks, xticklabels=ks, xlabel="tasks K", ylabel="MiB of weights held", title="weights a server holds")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(doc: dict, out: Path) -> dict[str, Path]:
    a = analyse(doc)
    paths = {"json": out / "serving.json", "md": out / "serving.md", "png": out / "serving.png"}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n")
    paths["md"].write_text(markdown(doc, a))
    chart(doc, a, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for serving.{json,md,png}")
    p.add_argument("--report", type=Path, help="only rewrite the table and chart from this JSON")
    p.add_argument("--tiny", action="store_true", help="the preset's test-size twin (a smoke run of this script; figures mean nothing)")
    p.add_argument("--write-files", type=Path, metavar="DIR",
                   help="only write base weights and --tasks random adapter files of --preset into DIR, for python -m export.onnx")
    p.add_argument("--preset", default=PRESET, help=f"zoo preset for --write-files (default {PRESET})")
    p.add_argument("--tasks", type=int, default=3, help="adapter files for --write-files (default 3)")
    args = p.parse_args(argv)
    if args.write_files:
        args.write_files.mkdir(parents=True, exist_ok=True)
        base, adapters = make_files(args.write_files, args.tasks, tiny=args.tiny, preset=args.preset)
        print("\n".join(str(f) for f in (base, *adapters)))
        return 0
    if args.report:
        doc = json.loads(args.report.read_text())
        print(Path(write_reports(doc, args.report.parent)["md"]).read_text())
        return 0
    import importlib.metadata as md

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("building 16 adapter files ...", file=sys.stderr, flush=True)
        base, adapters = make_files(folder, max(KS), tiny=args.tiny)
        img = zoo_img(args.tiny)
        print("exporting the folded, routed (K = 1, 4, 16) and adapter-inputs files ...", file=sys.stderr, flush=True)
        files = export_all(folder, base, adapters, img)
        measured_sizes = sizes(files, adapters)
        print(f"timing {args.rounds} rounds ...", file=sys.stderr, flush=True)
        timing = timings(files, args.threads, args.rounds, args.warmup, img)
    env = M.environment() | {"onnxruntime": md.version("onnxruntime")}
    doc = {"command": "python -m benchmarks serving " + " ".join(argv if argv is not None else sys.argv[1:]), "started": started, "tiny": args.tiny,
           "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": env, "timing": timing, "sizes": measured_sizes}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_reports(doc, args.out)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
