"""`python -m benchmarks.quantize`: fp32, fp16 and INT8 ONNX exports side by side, in one run.

1. Latency and size (onnxruntime CPU, batch 8, `--threads` intra-op threads): ViT-S/16 with a
   seeded random rank-1 adapter, folded, exported fp32, fp16 and INT8 (export.quantize_int8,
   calibrated on 16 random inputs: ranges do not change the speed); each round runs every file
   once in rotating order, and ratios are medians of per-round ratios.
2. Accuracy on a real-image task, for an RLRR adapter and for the same base with a linear-probe
   head: test accuracy of the PyTorch fp32 model and of its fp32, fp16 and INT8 exports (INT8
   calibrated on `--calibration-images` train images), top-1 agreement with the PyTorch fp32
   model, the logits' relative error, file sizes. The adapter also goes through the CLI's own
   path (`export.export_onnx(dtype="int8", calibration=DATA)`), whose agreement sets
   `--min-agreement`'s default. Inputs: `--adapter FILE --weights BASE --probe-head FILE --data DIR`
   (DIR: an ImageFolder with train/ and test/); without them the digits task is prepared in
   `--work` (benchmarks/digits.py says exactly what it is).
3. CUDA: where onnxruntime-gpu runs on a GPU, the same latency and accuracy with its CUDA provider;
   otherwise the result says it was not measured.

Writes `results/quantize.json` and `results/quantize.md`. About 6 minutes on 2 CPU cores, training
the digits task included (6 min 10 s for the committed results).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import export
import rlrr
import zoo
from benchmarks import measure as M

RESULTS = Path(__file__).parent / "results"
DTYPES = ("fp32", "fp16", "int8")


def _sessions(paths: dict[str, Path], threads: int, cuda: bool) -> dict:
    import onnxruntime as ort

    out = {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        out[name] = ort.InferenceSession(str(path), options, providers=providers)
    return out


def _run(session, x: torch.Tensor) -> np.ndarray:
    feed = x.numpy().astype(np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: feed})[0], dtype=np.float32)


def export_three(model: torch.nn.Module, shape: tuple, folder: Path, name: str, calibration: list[torch.Tensor], what: str) -> dict[str, Path]:
    """The plain (folded) `model` as fp32, fp16 and INT8 ONNX files in `folder`."""
    exporter = export.OnnxExporter(external_data="no")
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(7))
    paths = {d: folder / f"{name}.{d}.onnx" for d in DTYPES}
    exporter.export(model, example, paths["fp32"], ["output"])
    exporter.export(copy.deepcopy(model).half(), example.half(), paths["fp16"], ["output"])
    export.quantize_int8(paths["fp32"], paths["int8"], export.Int8Inputs(calibration, [], what, "", False))
    return paths


def latency(args, folder: Path, cuda: bool) -> dict:
    """Section 1: ViT-S/16 folded, fp32 / fp16 / INT8, batch 8."""
    model, _ = zoo.build_model("vit_small_patch16_224")
    export.random_adapter(model.eval(), seed=0)
    export.fold(model)
    shape = (3, 224, 224)
    calib = [torch.randn(4, *shape, generator=torch.Generator().manual_seed(500 + i)) for i in range(4)]
    paths = export_three(model, shape, folder, "vit_s16", calib, "16 seeded random inputs")
    sessions = _sessions(paths, args.threads, cuda)
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(11))
    rounds = M.interleaved({d: (lambda s=s: _run(s, x)) for d, s in sessions.items()}, args.rounds, 2, torch.device("cpu"))
    walls = {d: rounds[d]["wall"] for d in DTYPES}
    size = {d: paths[d].stat().st_size for d in DTYPES}
    return {
        "model": "vit_small_patch16_224 (random weights, seeded random rank-1 adapter on every site, folded)",
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
        "providers": sessions["fp32"].get_providers(),
        "median_ms": {d: 1000 * M.median(walls[d]) for d in DTYPES},
        "ratio_vs_fp32": {d: M.paired_ratio(walls[d], walls["fp32"]) for d in ("fp16", "int8")},
        "size_bytes": size, "size_vs_fp32": {d: size[d] / size["fp32"] for d in ("fp16", "int8")},
        "raw_wall_s": walls,
    }


def _evaluate(sessions: dict, reference: torch.nn.Module, images, batch: int) -> dict:
    """Accuracy of the PyTorch fp32 model and of each session; agreement and logit errors against it."""
    labels = images.labels
    with torch.no_grad():
        ref = torch.cat([reference(x) for x in images.images.split(batch)])
    rows = {"pytorch fp32": {"accuracy": float((ref.argmax(1) == labels).float().mean())}}
    for name, session in sessions.items():
        t = time.perf_counter()
        got = [_run(session, x) for x in images.images.split(batch)]
        seconds = time.perf_counter() - t
        agree = export.agreement([[r] for r in ref.split(batch)], [[g] for g in got], 0.0)
        pred = torch.from_numpy(np.concatenate(got)).argmax(1)
        rows[f"onnx {name}"] = {"accuracy": float((pred == labels).float().mean()), "agreement": agree["top1"],
                                "logits_rel_err_mean": agree["mean_rel"], "logits_rel_err_max": agree["max_rel"],
                                "seconds": seconds}
    return rows


def accuracy(args, task: dict, folder: Path, cuda: bool) -> dict:
    """Section 2: the adapter and the linear probe, fp32 / fp16 / INT8, on the test images."""
    meta = rlrr.read_adapter_file(task["adapter"]).metadata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heads of another size, random-weight notes: the report says what was loaded
        adapted = zoo.from_adapter(task["adapter"], weights=task["weights"]).eval()
        probe = zoo.build_base(meta["preset"], meta["num_classes"], task["weights"], img_size=meta.get("img_size"), tiny=bool(meta.get("tiny"))).eval()
    from safetensors.torch import load_file

    probe.get_submodule(zoo.classifier_name(probe)).load_state_dict(load_file(str(task["head"])))
    shape = zoo.input_size(adapted, meta.get("img_size"))
    data = Path(task["data"])
    test = export.read_images(data / "test", adapted, shape)
    train = export.read_images(data / "train", adapted, shape)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.calibration_images]
    calib = list(train.images[pick].split(args.batch))
    what = f"{len(pick)} train images of {data}"
    out = {"test": test.description, "calibration": what, "rows": {}}
    for name, model in (("rlrr", adapted), ("linear_probe", probe)):
        plain = export.fold(copy.deepcopy(model)) if rlrr.adapters_of(model) else model
        paths = export_three(plain, shape, folder, name, calib, what)
        rows = _evaluate(_sessions(paths, args.threads, cuda), model, test, args.batch)
        for d in DTYPES:
            rows[f"onnx {d}"]["size_bytes"] = paths[d].stat().st_size
        out["rows"][name] = rows
    spec = export.resolve_spec(None, adapter=task["adapter"], weights=task["weights"])
    cli = export.export_onnx(spec, folder / "cli.int8.onnx", adapter=task["adapter"], dtype="int8",
                             calibration=str(data), calibration_images=args.calibration_images, eval_images=10**6,
                             min_agreement=0.0, latency_runs=args.rounds, warmup=2, batch_sizes=(args.batch,), force=True)
    out["cli_int8"] = {"agreement": cli.agreement, "size_vs_fp32": cli.size_bytes / cli.quantization["fp32_size_bytes"],
                       "latency_vs_fp32": cli.latency.ratio if cli.latency else None, "checked_on": cli.quantization["checked_on"]}
    return out


def markdown(doc: dict) -> str:
    lines = [f"# Quantized exports (`python -m benchmarks.quantize`, {doc['date']})", ""]
    lat = doc["latency"]
    lines += [f"## Latency and size: {lat['model']}", "",
              f"onnxruntime {doc['versions'].get('onnxruntime')}, {', '.join(lat['providers'])}, batch {lat['batch']}, {lat['threads']} threads, "
              f"{lat['rounds']} rounds (ratios: median of per-round ratios [min-max])", "",
              "| export | median latency (ms) | latency / fp32 | file (MB) | file / fp32 |", "|---|---|---|---|---|"]
    for d in DTYPES:
        r = lat["ratio_vs_fp32"].get(d)
        ratio = f"{r['median']:.3f} [{r['min']:.2f}-{r['max']:.2f}]" if r else "1"
        lines.append(f"| {d} | {lat['median_ms'][d]:.1f} | {ratio} | {lat['size_bytes'][d] / 1e6:.1f} | {lat['size_vs_fp32'].get(d, 1.0):.3f} |")
    acc = doc["accuracy"]
    lines += ["", f"## Accuracy: {doc['task']}", "", f"Test: {acc['test']}; INT8 calibration: {acc['calibration']}.", "",
              "| model | export | test accuracy | top-1 agreement with PyTorch fp32 | logits rel. error mean / max | file (MB) |",
              "|---|---|---|---|---|---|"]
    for name, rows in acc["rows"].items():
        for row, r in rows.items():
            agree = f"{r['agreement']:.2%}" if "agreement" in r else "-"
            err = f"{r['logits_rel_err_mean']:.1e} / {r['logits_rel_err_max']:.1e}" if "agreement" in r else "-"
            size = f"{r['size_bytes'] / 1e6:.2f}" if "size_bytes" in r else "-"
            lines.append(f"| {name} | {row} | {r['accuracy']:.2%} | {agree} | {err} | {size} |")
    c = acc["cli_int8"]
    lines += ["", f"CLI path (`python -m export.onnx --adapter ... --dtype int8 --calibration DATA`): top-1 agreement "
                  f"{c['agreement']['top1']:.2%} ({c['agreement']['agree']}/{c['agreement']['samples']}, {c['checked_on']}), "
                  f"file {c['size_vs_fp32']:.3f} of fp32" + (f", latency {c['latency_vs_fp32']:.3f} of fp32" if c["latency_vs_fp32"] else "") + "."]
    lines += ["", f"## CUDA: {doc['cuda']['note']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", type=Path, help="RLRR adapter file (with the metadata finetune writes)")
    p.add_argument("--weights", type=Path, help="the base model's weights the adapter was trained on")
    p.add_argument("--probe-head", type=Path, help="the linear probe's head tensors (safetensors, the head module's own names)")
    p.add_argument("--data", type=Path, help="ImageFolder with train/ (calibration) and test/ (accuracy)")
    p.add_argument("--work", type=Path, default=Path("build/quantize-digits"), help="where the digits task is prepared (default %(default)s)")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    given = [args.adapter, args.weights, args.probe_head, args.data]
    if any(given) and not all(given):
        p.error("--adapter, --weights, --probe-head and --data go together (or none: the digits task)")
    if all(given):
        task = {"adapter": args.adapter, "weights": args.weights, "head": args.probe_head, "data": args.data}
        name, facts = f"adapter {args.adapter}, test images {args.data / 'test'}", {}
    else:
        from benchmarks.digits import prepare

        prepared = prepare(args.work)
        task = {"adapter": prepared["adapter"], "weights": prepared["base"], "head": prepared["head"], "data": prepared["data"]}
        name, facts = "scikit-learn digits (benchmarks/digits.py): ViT-Ti/16 at 64 px, base pretrained here on digits 0-4", prepared["facts"]
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    doc = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "task": name, "task_facts": facts,
           "environment": M.environment(), "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        doc["latency"] = latency(args, folder, cuda=False)
        doc["accuracy"] = accuracy(args, task, folder, cuda=False)
        if has_cuda:
            doc["cuda"] = {"note": "onnxruntime-gpu, CUDA provider (TF32 off)", "latency": latency(args, folder, cuda=True),
                           "accuracy": accuracy(args, task, folder, cuda=True)}
        else:
            doc["cuda"] = {"note": f"not measured: no CUDA provider here (onnxruntime {ort.__version__}, providers "
                                   f"{', '.join(ort.get_available_providers())}, torch.cuda {torch.cuda.is_available()})"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize.json").write_text(json.dumps(doc, indent=2, default=str))
    table = markdown(doc)
    (args.out / "quantize.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
