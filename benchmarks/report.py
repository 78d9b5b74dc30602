"""Turn the benchmark's raw results into the JSON file, the markdown table and the PNG chart.

`python -m benchmarks.report results/benchmark.json` rewrites the markdown and the chart from a
saved JSON without measuring again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import measure as M

NAMES = {
    "full": "full fine-tuning",
    "full_fwd_bwd": "floor: full fine-tuning, forward + backward only",
    "linear_probe": "linear probing",
    "rlrr": "RLRR (ours, r=1, paper placement)",
    "lora_r8": "PEFT LoRA r=8 (qkv/proj/fc1/fc2)",
    "ssf": "SSF (official form, on activations)",
    "rlrr_eager": "ablation: RLRR, op by op (native=False)",
    "rlrr_compiled": "ablation: RLRR, compiled fused kernels",
    "rlrr_linears": "ablation: RLRR on LoRA's linears only",
    "rlrr_parametrize": "ablation: RLRR, parametrize path (no recompute Function)",
    "dense_floor": "yardstick: frozen model, backward dX only",
    "base": "base model",
    "rlrr_unmerged": "RLRR unmerged, eval (W' cached)",
    "rlrr_unmerged_recomputed": "RLRR unmerged, W' recomputed per call",
    "rlrr_folded": "RLRR folded",
}
MODEL_NAMES = {"vit_s16": "ViT-S/16", "vit_b16": "ViT-B/16", "vit_h14": "ViT-H/14"}


def _tasks(doc: dict, name: str) -> list[dict]:
    return [t for t in doc["tasks"] if t.get("ok") and t["spec"]["task"] == name]


def _ratio(r: dict) -> str:
    return f"{r['median']:.3f} [{r['min']:.2f}–{r['max']:.2f}]"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def _load(t: dict) -> str:
    a, b = t.get("load_before") or t.get("load"), t.get("load_after")
    return f"{a[0]:.1f}" + (f"→{b[0]:.1f}" if b else "")


def _timing(t: dict) -> dict:
    """A `train_timing` (or `floor_ratio`) task's rows: medians, phases, and each variant's paired ratios to the references."""
    v = t["variants"]
    rows = {}
    for name, r in v.items():
        rows[name] = {"median_s": r["median_s"], "median_cpu_s": r["median_cpu_s"], "phases_s": r["phases_s"], "trainable_params": r["trainable_params"],
                      "faults_per_step": r.get("faults_per_step")}
        for ref in ("lora_r8", "full", "full_fwd_bwd"):
            if ref in v:
                rows[name][f"x_{ref}"] = M.paired_ratio(r["wall"], v[ref]["wall"])
                rows[name][f"x_{ref}_cpu"] = M.paired_ratio(r["cpu"], v[ref]["cpu"])
    return {"rows": rows, "load": _load(t), "rounds": t["rounds"], "warmup": t["warmup"], "batch": t.get("batch", 8),
            "amp": t.get("amp"), "device": t.get("device", "cpu")}


def _source(a: dict, model: str, ref: str) -> dict | None:
    """The timing whose ratio to `ref` the targets use: `floor_ratio` (many rounds) for the floor and full FT when it ran."""
    focused = a["floor"].get(model)
    if focused and ref in ("full_fwd_bwd", "full") and f"x_{ref}" in focused["rows"].get("rlrr", {}):
        return focused
    return a["training"].get(model)


def _gemm_floor(t: dict) -> dict:
    """`gemm_floor`'s medians; where it timed the whole model's floor too, the reads' share of that
    step (taken within the task: the machine's speed wanders between tasks)."""
    out = {"dense_s": t["dense"]["median_s"], "with_dw_s": t["with_dw"]["median_s"], "load": _load(t)}
    if "model_floor" in t:
        step = t["model_floor"]["median_s"]
        out |= {"read_s": t["read_s"], "rounds": t["rounds"], "model_floor_s": step, "read_share": t["read_s"] / step}
    return out


def _beside_full(a: dict, model: str, floor_over_full: float | None) -> str:
    """What RLRR / full FT comes to from measured parts, on top of the floor / full FT bound.

    Reading each adapted W once per direction outside the GEMMs (`gemm_floor`'s clocked reads) is the
    least a rescale of W outside the GEMMs adds; RLRR's own kernels (`own_work`) and its optimizer
    step (`floor_ratio`'s phases) are what it does add. Each as a share of a step in its own task.
    """
    source = a["floor"].get(model)
    floor = a["gemm_floor"].get(model, {})
    if floor_over_full is None or source is None or "full_fwd_bwd" not in source["rows"] or "rlrr" not in source["rows"]:
        return ""
    text = ""
    if "read_share" in floor:
        text += f"; with W read once per direction outside the GEMMs {floor_over_full * (1 + floor['read_share']):.3f}"
    work = a["own_work"].get(model, {}).get("variants", {}).get("rlrr")
    if work:
        optimizer = source["rows"]["rlrr"]["phases_s"]["optimizer"] / source["rows"]["full_fwd_bwd"]["median_s"]
        text += f"; with RLRR's measured kernels and optimizer step {floor_over_full * (1 + work['share'] + optimizer):.3f}"
    return text


def analyse(doc: dict) -> dict:
    """Ratios against each target, per model, from the raw rounds."""
    out: dict = {"training": {}, "floor": {}, "memory": {}, "inference": {}, "onnx": {}, "big": {}, "targets": []}
    for kind, task in (("training", "train_timing"), ("floor", "floor_ratio")):
        out[kind] = {t["model"]: _timing(t) for t in _tasks(doc, task)}
    for t in _tasks(doc, "train_memory"):
        row = {k: t[k] for k in ("peak_rss_mib", "growth_mib", "rss_built_mib", "saved_mib") if k in t} | {"load": _load(t)}
        if "cuda_peak_mib" in t:  # on a GPU the peak that matters is the device's
            row |= {"peak_rss_mib": t["cuda_peak_mib"], "growth_mib": t["cuda_growth_mib"], "host_peak_rss_mib": t["peak_rss_mib"]}
        out["memory"].setdefault(t["model"], {})[t["variant"]] = row
    for t in _tasks(doc, "inference") + _tasks(doc, "onnx"):
        kind = t["spec"]["task"]
        v = t["variants"]
        out[kind][t["model"]] = {"load": _load(t), "rows": {n: {"median_s": r["median_s"], "x_base": M.paired_ratio(r["wall"], v["base"]["wall"]),
                                                                **{k: r[k] for k in ("export_s", "file_mib", "provider") if k in r}} for n, r in v.items()},
                                 "err": t.get("fold_max_rel_err", t.get("folded_vs_unmerged_max_rel_err")), "same_graph": t.get("same_graph")}
    for t in _tasks(doc, "big_apply_fold") + _tasks(doc, "big_onnx"):
        out["big"].setdefault(t["model"], {}).update({k: v for k, v in t.items() if k not in ("spec", "ok")})
    out["own_work"] = {t["model"]: t for t in _tasks(doc, "own_work")}
    floors = {t["model"]: t for t in _tasks(doc, "gemm_floor")}
    out["gemm_floor"] = {m: _gemm_floor(t) for m, t in floors.items()}

    def target(what: str, value: float | None, low: float | None, high: float | None, detail: str = "") -> None:
        met = None if value is None else (low is None or value >= low) and (high is None or value <= high)
        bound = f"≤ {high}" if low is None else f"{low}–{high}"
        out["targets"].append({"target": what, "measured": value, "bound": bound, "met": met, "detail": detail})

    for model in {**out["training"], **out["floor"]}:
        tr = out["training"].get(model, {"rows": {}})
        rows = tr["rows"]
        name = MODEL_NAMES.get(model, model)
        floor = out["gemm_floor"].get(model)
        bounds = {}
        if "x_lora_r8" in rows.get("full_fwd_bwd", {}):  # RLRR runs every GEMM the floor runs: RLRR / LoRA ≥ floor / LoRA, paired
            bounds["lora_r8"] = rows["full_fwd_bwd"]["x_lora_r8"]["median"]
        elif "dense_floor" in rows and floor and "lora_r8" in rows:  # older results: dX-only backward + the dW GEMMs, from two tasks
            bounds["lora_r8"] = (rows["dense_floor"]["median_s"] + floor["with_dw_s"] - floor["dense_s"]) / rows["lora_r8"]["median_s"]
        full_rows = (_source(out, model, "full") or tr)["rows"]
        if "x_full" in full_rows.get("full_fwd_bwd", {}):  # RLRR ≥ full fine-tuning's forward + backward (same GEMMs): measured, paired
            bounds["full"] = full_rows["full_fwd_bwd"]["x_full"]["median"]
        elif "full" in rows:  # older results: full fine-tuning's own phases
            ph = rows["full"]["phases_s"]
            bounds["full"] = (ph["forward"] + ph["backward"]) / sum(ph.values())
        tr["bounds"] = bounds
        beside = _beside_full(out, model, bounds.get("full"))
        for ref, label, high in (("full_fwd_bwd", "full FT forward + backward (the floor)", 1.06), ("full", "full fine-tuning", 0.99),
                                 ("lora_r8", "PEFT LoRA r=8", 1.05)):
            source = _source(out, model, ref) or tr
            r = source["rows"].get("rlrr")
            if r and f"x_{ref}" in r:
                bound = (f"; lower bound by arithmetic {bounds[ref]:.3f}" if ref in bounds else "") + (beside if ref == "full" else "")
                stretch = "; stretch ≤ 1.03" if ref == "full_fwd_bwd" else ""
                alone = f"; {source['rounds']} rounds of the floor, full FT and RLRR alone" if source is out["floor"].get(model) else ""
                target(f"{name} training step, RLRR / {label}", r[f"x_{ref}"]["median"], None, high,
                       _ratio(r[f"x_{ref}"]) + f"; CPU time {r[f'x_{ref}_cpu']['median']:.3f}" + bound + stretch + alone)
    for model, mem in out["memory"].items():
        if "rlrr" in mem and "lora_r8" in mem:
            name = MODEL_NAMES.get(model, model)
            growth = mem["rlrr"]["growth_mib"] / mem["lora_r8"]["growth_mib"]
            saved = f"; saved for backward {mem['rlrr']['saved_mib'] / mem['lora_r8']['saved_mib']:.2f}" if "saved_mib" in mem["rlrr"] else ""
            target(f"{name} peak training RSS, RLRR / PEFT LoRA r=8", mem["rlrr"]["peak_rss_mib"] / mem["lora_r8"]["peak_rss_mib"], None, 0.85,
                   f"{mem['rlrr']['peak_rss_mib']:.0f} / {mem['lora_r8']['peak_rss_mib']:.0f} MiB; growth over the built model {growth:.2f}{saved}")
    for kind, label in (("inference", "PyTorch"), ("onnx", "onnxruntime")):
        for model, inf in out[kind].items():
            name = MODEL_NAMES.get(model, model)
            rows = inf["rows"]
            if "rlrr_unmerged" in rows:
                target(f"{name} {label} latency, RLRR unmerged (eval) / base", rows["rlrr_unmerged"]["x_base"]["median"], None, 1.05, _ratio(rows["rlrr_unmerged"]["x_base"]))
            if "rlrr_folded" in rows:
                target(f"{name} {label} latency, folded / base", rows["rlrr_folded"]["x_base"]["median"], 0.97, 1.03, _ratio(rows["rlrr_folded"]["x_base"]))
    for model, big in out["big"].items():
        name = MODEL_NAMES.get(model, model)
        if "apply_fold_copies" in big:
            spread = (f"; median of {len(big['rounds'])} rounds [{big['apply_fold_copies_min']:.2f}–{big['apply_fold_copies_max']:.2f}], "
                      f"the first (cold) {big['apply_fold_copies_first']:.2f}") if "rounds" in big else ""
            target(f"{name} apply + fold, in copies of every parameter", big["apply_fold_copies"], None, 6,
                   f"apply {big['apply_s']:.2f} s + fold {big['fold_s']:.2f} s; one copy {min(big['copy_s']):.3f} s (fastest of {len(big['copy_s'])}, same process)"
                   + spread)
        elif "apply_fold_s" in big:
            target(f"{name} apply + fold time (s)", big["apply_fold_s"], None, 20, f"apply {big['apply_s']:.1f} s + fold {big['fold_s']:.1f} s")
        if "apply_fold_peak_over_fp32" in big:
            target(f"{name} apply/fold peak RSS / fp32 model size", big["apply_fold_peak_over_fp32"], None, 1.5,
                   f"peak {max(big['apply_peak_rss_mib'], big['fold_peak_rss_mib']):.0f} MiB, model {big['fp32_mib']:.0f} MiB fp32 (process incl. build: {big['process_peak_rss_mib']:.0f} MiB)")
    return out


def markdown(doc: dict, a: dict) -> str:
    env = doc["environment"]
    kernels = doc.get("kernels", "inductor")
    lines = [
        "# RLRR benchmark",
        "",
        f"`{doc['command']}`, {doc['started']} → {doc['finished']}.",
        "",
        f"Machine: {M.machine_line(env)}.",
        "",
        "Random weights, AdamW, 224² unless said. Each training variant runs in one process and the variants are stepped in turn, "
        "one step each per round, after warm-up rounds; a ratio is taken within each round (the same load) and reported as the "
        "median [min–max] over rounds. `load` is the 1-minute load average before→after each task. RLRR trains through the "
        "library's default path (the recompute Function, native loops on CPU); the compiled-kernels ablation uses "
        + (f"`torch.compile` ({kernels}), compiled during warm-up." if kernels else "eager ops too (`--kernels none`)."),
        "",
        "## Targets",
        "",
        "| target | measured | bound | met | detail |",
        "|---|---|---|---|---|",
    ]
    for t in a["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']:.3f} | {t['bound']} | {met} | {t['detail']} |")
    for model, fl in a["floor"].items():
        lines += ["", f"## RLRR at the floor, {MODEL_NAMES.get(model, model)} ({fl['device']}, batch {fl['batch']}; load {fl['load']}, "
                  f"{fl['rounds']} rounds after {fl['warmup']} warm-up)", "",
                  "The step-time targets' ratios: the floor, full fine-tuning and RLRR alone in one process, stepped in turn (task `floor_ratio`); "
                  "each ratio as median [min–max] and, after it, the middle half of the rounds.", "",
                  "| variant | step s | CPU s | × floor | × full FT | fwd / bwd / opt s |", "|---|---:|---:|---|---|---|"]
        for name, r in fl["rows"].items():
            ph = r["phases_s"]
            ratios = " | ".join(f"{_ratio(r[k])}, {r[k]['q25']:.3f}–{r[k]['q75']:.3f}" for k in ("x_full_fwd_bwd", "x_full"))
            lines.append(f"| {NAMES.get(name, name)} | {r['median_s']:.3f} | {r['median_cpu_s']:.2f} | {ratios} | "
                         f"{ph['forward']:.2f} / {ph['backward']:.2f} / {ph['optimizer']:.3f} |")
    for model, tr in a["training"].items():
        mem = a["memory"].get(model, {})
        setup = f"{tr['device']}, batch {tr['batch']}, {tr['amp'] + ' autocast' if tr['amp'] else 'fp32'}"
        lines += ["", f"## Training step, {MODEL_NAMES.get(model, model)} ({setup}; load {tr['load']}, {tr['rounds']} rounds after {tr['warmup']} warm-up)", "",
                  "| variant | trainable | step s | CPU s | × floor | × LoRA | × full FT | fwd / bwd / opt s | page faults / step | peak mem MiB | growth MiB | saved for bwd MiB | mem load |",
                  "|---|---:|---:|---:|---|---|---|---|---:|---:|---:|---:|---|"]
        for name, r in tr["rows"].items():
            m = mem.get(name, {})
            ph = r["phases_s"]
            ratios = " | ".join(_ratio(r[k]) if k in r else "" for k in ("x_full_fwd_bwd", "x_lora_r8", "x_full"))
            lines.append(
                f"| {NAMES.get(name, name)} | {r['trainable_params']:,} | {r['median_s']:.3f} | {r['median_cpu_s']:.2f} | {ratios} | "
                f"{ph['forward']:.2f} / {ph['backward']:.2f} / {ph['optimizer']:.3f} | {_num(r.get('faults_per_step'))} | "
                f"{_num(m.get('peak_rss_mib'))} | {_num(m.get('growth_mib'))} | {_num(m.get('saved_mib'))} | {m.get('load', '')} |")
        floor = a["gemm_floor"].get(model)
        if floor:
            lines += ["", f"GEMM floor (the adapted linears' GEMMs alone, load {floor['load']}): forward + dX {floor['dense_s']:.3f} s; "
                      f"with the weight-gradient GEMM dYᵀX {floor['with_dw_s']:.3f} s (+{floor['with_dw_s'] - floor['dense_s']:.3f} s a step, "
                      "paid by full fine-tuning and RLRR, not by LoRA)." + (
                          f" One read of every adapted W before its forward GEMM and one before its backward, clocked between "
                          f"the GEMMs: {1e3 * floor['read_s']:.1f} ms a step, {100 * floor['read_share']:.2f} % of the whole model's "
                          f"forward + backward timed in the same {floor['rounds']} rounds ({floor['model_floor_s']:.3f} s)." if "read_s" in floor else "")]
    for model, work in a["own_work"].items():
        lines += ["", f"## RLRR's own work per step, {MODEL_NAMES.get(model, model)} (load {_load(work)}, {work['rounds']} rounds after {work['warmup']} warm-up)", "",
                  "Time inside the training kernels (W' in forward; W' and the scale gradients in backward), every adapted linear, "
                  "one step; the two paths stepped in turn.", "",
                  "| path | kernels ms / step | step s | share of the step |", "|---|---:|---:|---:|"]
        for name, r in work["variants"].items():
            lines.append(f"| {NAMES.get(name, name)} | {1e3 * r['median_kernel_s']:.1f} | {r['median_s']:.3f} | {100 * r['share']:.1f} % |")
        if work.get("native_failed"):
            lines.append(f"\nThe native loops could not be built, so both rows ran op by op: {work['native_failed']}")
    for kind, title in (("inference", "Inference latency, PyTorch eager, no_grad"), ("onnx", "Inference latency, onnxruntime")):
        for model, inf in a[kind].items():
            lines += ["", f"## {title}, {MODEL_NAMES.get(model, model)} (load {inf['load']})", "",
                      "| model | latency s | × base | notes |", "|---|---:|---|---|"]
            for name, r in inf["rows"].items():
                notes = ", ".join(f"{k} {r[k]:.1f}" if isinstance(r[k], float) else f"{r[k]}" for k in ("export_s", "file_mib", "provider") if k in r)
                lines.append(f"| {NAMES.get(name, name)} | {r['median_s']:.4f} | {_ratio(r['x_base'])} | {notes} |")
            if inf.get("err") is not None:
                lines.append(f"\nfolded vs unmerged PyTorch output: max abs error / output scale = {inf['err']:.1e}")
            if inf.get("same_graph") is not None:
                lines.append(f"base and folded ONNX graphs: {'the same operators and initializer shapes' if inf['same_graph'] else '**different**'}")
    for model, big in a["big"].items():
        lines += ["", f"## {MODEL_NAMES.get(model, model)}: apply, fold, ONNX export", "", "| step | time s | peak RSS MiB | notes |", "|---|---:|---:|---|"]
        if "apply_s" in big:
            lines += [
                f"| build (timm, random init) | {big['build_s']:.1f} | {big['rss_built_mib']:.0f} (after) | {big['params']:,} parameters, {big['fp32_mib']:.0f} MiB fp32 |",
                f"| `rlrr.apply` (paper placement) | {big['apply_s']:.2f} | {big['apply_peak_rss_mib']:.0f} | load {_load(big)} |",
                f"| `export.fold` | {big['fold_s']:.2f} | {big['fold_peak_rss_mib']:.0f} | |",
            ]
            if "copy_s" in big:
                lines.append(f"| yardstick: one copy of every parameter into buffers allocated beforehand | {min(big['copy_s']):.3f} | | "
                             f"fastest of {', '.join(f'{c:.3f}' for c in big['copy_s'])} s; apply + fold = {big['apply_fold_copies']:.1f} copies |")
            if "rounds" in big:
                lines.append(f"\nThe median of {len(big['rounds'])} rounds (apply, fold, yardstick, in turn), per round in copies: "
                             + ", ".join(f"{r['apply_fold_copies']:.2f}" for r in big["rounds"]) + " (the first cold: imports, the native loop's load).")
        if "export_s" in big:
            lines.append(f"| ONNX export of the folded model (dynamo, external data, batch 1) | {big['export_s']:.1f} | {big['export_peak_rss_mib']:.0f} | "
                         f"{big['export_files_mib']:.0f} MiB written; RSS before {big['export_rss_before_mib']:.0f} MiB (model + imports); load {big['export_load_before'][0]:.1f} |")
    if doc.get("skipped"):
        lines += ["", "Skipped: " + ", ".join(doc["skipped"]) + "."]
    failed = [t for t in doc["tasks"] if not t.get("ok")]
    if failed:
        lines += ["", "## Failed tasks", ""] + [f"- {t['spec']}: {t.get('error')}" for t in failed]
    return "\n".join(lines) + "\n"


def _short(v: str) -> str:
    return NAMES[v].split(" (")[0].replace("ablation: ", "abl: ").replace("yardstick: ", "")


def chart(a: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    models = list(a["training"])
    width = 0.8 / max(len(models), 1)

    ax = axes[0, 0]
    ref = "x_full_fwd_bwd" if all("x_full_fwd_bwd" in a["training"][m]["rows"].get("rlrr", {}) for m in models) else "x_lora_r8"
    variants = [v for v in NAMES if any(ref in a["training"][m]["rows"].get(v, {}) for m in models) and v != "linear_probe"]
    for i, m in enumerate(models):
        rows = a["training"][m]["rows"]
        idx = [j for j, v in enumerate(variants) if ref in rows.get(v, {})]
        r = [rows[variants[j]][ref] for j in idx]
        ax.bar([j + i * width for j in idx], [x["median"] for x in r], width, capsize=3, label=MODEL_NAMES.get(m, m),
               yerr=[[x["median"] - x["min"] for x in r], [x["max"] - x["median"] for x in r]])
    if ref == "x_full_fwd_bwd":
        ax.axhline(1.06, color="k", ls="--", lw=1, label="target for RLRR: 1.06× the floor")
        ax.set_ylabel("step time / full FT forward + backward (per-round ratio: median, min–max)")
    else:
        ax.axhline(1.05, color="k", ls="--", lw=1, label="target: 1.05× LoRA")
        ax.set_ylabel("step time / PEFT LoRA r=8 (per-round ratio: median, min–max)")
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(variants))], [_short(v) for v in variants], rotation=25, ha="right", fontsize=8)
    ax.set_title("Training step (AdamW), every variant" + ("; the targets' ratios: floor_ratio, in benchmark.md" if a["floor"] else ""), fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    mem_models = list(a["memory"])
    variants = [v for v in NAMES if any(v in a["memory"][m] for m in mem_models)]
    for i, m in enumerate(mem_models):
        idx = [j for j, v in enumerate(variants) if v in a["memory"][m]]
        ax.bar([j + i * width for j in idx], [a["memory"][m][variants[j]]["peak_rss_mib"] for j in idx], width, label=MODEL_NAMES.get(m, m))
    ax.set_xticks([j + width * (len(mem_models) - 1) / 2 for j in range(len(variants))], [_short(v) for v in variants], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("peak RSS of a process training only that variant (MiB)")
    ax.set_title("Peak training memory")
    if mem_models:  # (a run in parts may have no memory rows: no legend to draw)
        ax.legend(fontsize=8)

    ax = axes[1, 0]
    labels, vals, errs = [], [], [[], []]
    for kind, tag in (("inference", "PyTorch"), ("onnx", "onnxruntime")):
        for m, inf in a[kind].items():
            for v, r in inf["rows"].items():
                if v != "base":
                    labels.append(f"{MODEL_NAMES.get(m, m)} {tag}: {NAMES[v].replace('RLRR ', '')}")
                    vals.append(r["x_base"]["median"])
                    errs[0].append(r["x_base"]["median"] - r["x_base"]["min"])
                    errs[1].append(r["x_base"]["max"] - r["x_base"]["median"])
    ax.barh(range(len(vals)), vals, xerr=errs, capsize=3, color="tab:green")
    ax.axvline(1.0, color="k", lw=1)
    ax.axvline(1.05, color="k", ls="--", lw=1)
    ax.set_yticks(range(len(vals)), labels, fontsize=8)
    ax.set_xlabel("latency / base model (per-round ratio: median, min–max); dashed: 1.05")
    ax.set_title("Inference latency")

    ax = axes[1, 1]
    for m, big in a["big"].items():
        steps = [(k, big[f"{k}_s"], big.get(f"{k}_peak_rss_mib")) for k in ("apply", "fold", "export") if f"{k}_s" in big]
        if "copy_s" in big:  # the yardstick: one copy of every parameter
            steps.insert(2, ("one copy\n(yardstick)", min(big["copy_s"]), None))
        ax.bar([k for k, _, _ in steps], [t for _, t, _ in steps], color="tab:purple")
        for i, (_, t, peak) in enumerate(steps):
            note = f"{t:.1f} s" + (f"\npeak RSS {peak / big['fp32_mib']:.2f}× fp32 size" if peak and "fp32_mib" in big else "")
            ax.annotate(note, (i, t), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.2 * max((t for _, t, _ in steps), default=1))
        ax.set_title(f"{MODEL_NAMES.get(m, m)}: apply, fold, ONNX export (peak RSS includes imports)")
        ax.set_ylabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(doc: dict, out: Path) -> dict[str, str]:
    a = analyse(doc)
    doc = {**doc, "analysis": a}
    paths = {"json": out / "benchmark.json", "md": out / "benchmark.md", "png": out / "benchmark.png"}
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["md"].write_text(markdown(doc, a))
    try:
        chart(a, paths["png"])
    except ImportError:  # matplotlib is the `bench` extra: no chart without it
        del paths["png"]
    return {k: str(v) for k, v in paths.items()}


def _timing_ratios(doc: dict) -> dict[tuple[str, str], dict]:
    """(model, row) -> the paired ratio of RLRR's step to each reference, from the raw rounds."""
    out = {}
    a = analyse(doc)
    for model in {**a["training"], **a["floor"]}:
        for ref in ("full_fwd_bwd", "full", "lora_r8"):
            r = (_source(a, model, ref) or {"rows": {}})["rows"].get("rlrr", {})
            if f"x_{ref}" in r:
                out[(model, ref)] = r[f"x_{ref}"]
    return out


def compare(first: dict, second: dict) -> str:
    """Two runs' RLRR step ratios side by side, and whether each median lies in the other's [min–max]."""
    a, b = _timing_ratios(first), _timing_ratios(second)
    lines = ["| model | RLRR / | run 1 | run 2 | each median inside the other's range |", "|---|---|---|---|---|"]
    for key in [k for k in a if k in b]:
        x, y = a[key], b[key]
        inside = x["min"] <= y["median"] <= x["max"] and y["min"] <= x["median"] <= y["max"]
        lines.append(f"| {MODEL_NAMES.get(key[0], key[0])} | {NAMES[key[1]].split(':')[0].split(' (')[0]} | {_ratio(x)} | {_ratio(y)} | {'yes' if inside else '**no**'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "--compare":  # python -m benchmarks.report --compare RUN1.json RUN2.json
        print(compare(*(json.loads(Path(f).read_text()) for f in sys.argv[2:4])), end="")
        sys.exit(0)
    source = Path(sys.argv[1])
    doc = json.loads(source.read_text())
    doc.pop("analysis", None)
    print(write_reports(doc, source.parent))
