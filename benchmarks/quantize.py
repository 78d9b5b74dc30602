"""`python -m benchmarks.quantize`: fp32, fp16 and INT8 ONNX exports side by side, in one run.

1. Latency and size (onnxruntime CPU, batch 8, `--threads` intra-op threads): ViT-S/16 with a
   seeded random rank-1 adapter, folded, exported fp32, fp16 and INT8 (export.quantize_int8,
   calibrated on 16 random inputs: ranges do not change the speed); each round runs every file
   once in rotating order, and ratios are medians of per-round ratios.
2. Accuracy on the transfer benchmark's real-image task (`--task digits`, docs/transfer.md): its
   committed RLRR adapter (`results/transfer/<task>/rlrr_best.safetensors`) and the same backbone
   with its linear probe's head (`linear_head.safetensors`, a plain weights file): test accuracy of
   the PyTorch fp32 model and of its fp32, fp16 and INT8 exports (INT8 calibrated on
   `--calibration-images` train images), top-1 agreement with the PyTorch fp32 model, the logits'
   relative error, file sizes. The adapter also goes through the CLI's own path
   (`export.export_onnx(dtype="int8", calibration=DATA)`), whose agreement sets `--min-agreement`'s
   default. The backbone comes from the transfer cache (`benchmarks.transfer.backbone.ensure()`,
   pretrained first if missing, about 5 minutes) and must be the one the results were trained on.
3. CUDA: where onnxruntime-gpu runs on a GPU, the same latency and accuracy with its CUDA provider;
   otherwise the result says it was not measured.

Writes `results/quantize.json` and `results/quantize.md`, with the command and the wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
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
TRANSFER = RESULTS / "transfer"  # the transfer benchmark's adapters and heads (docs/transfer.md)
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


def _int8_draw(plain, model, fp32: Path, folder: Path, images: torch.Tensor, test, args, cuda: bool) -> dict:
    """INT8 accuracy and agreement with one calibration draw: how much the choice of images moves them."""
    path = folder / "draw.int8.onnx"
    export.quantize_int8(fp32, path, export.Int8Inputs(list(images.split(args.batch)), [], "a draw", "", False))
    row = _evaluate(_sessions({"int8": path}, args.threads, cuda), model, test, args.batch)["onnx int8"]
    return {"accuracy": row["accuracy"], "agreement": row["agreement"]}


def task_files(task: str, cache: Path | None) -> dict:
    """The transfer benchmark's files for `task` (docs/transfer.md, "Files for other work"): its best RLRR
    adapter, its best linear probe's head, the backbone (rebuilt if the cache has none) and the ImageFolder."""
    from benchmarks.transfer import backbone, tasks

    folder = TRANSFER / task
    record = backbone.ensure(cache)
    committed = json.loads((RESULTS / "transfer.json").read_text())["backbone"]["digest"]
    if record["digest"] != committed:
        raise SystemExit(f"the cached backbone {record['file']} (digest {record['digest'][:12]}) is not the one the transfer "
                         f"results were trained on ({committed[:12]}): rerun python -m benchmarks.transfer")
    data = (Path(cache) if cache else backbone.default_cache()) / "data" / task
    manifest = tasks.ensure_imagefolder(task, data)
    return {"adapter": folder / "rlrr_best.safetensors", "head": folder / "linear_head.safetensors", "weights": Path(record["file"]),
            "data": data, "backbone_digest": record["digest"], "data_digest": manifest.get("digest")}


def _probe(files: dict) -> torch.nn.Module:
    """The frozen backbone with the linear probe's head: a plain model, no adapter."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(files["head"]), "pt") as f:
        meta = json.loads(f.metadata()["finetune"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the backbone's 100-class head is not loaded: the probe's replaces it
        model = zoo.build_base(meta["preset"], meta["num_classes"], files["weights"], img_size=meta["img_size"], tiny=bool(meta.get("tiny")),
                               **meta.get("model_kwargs", {}))
    head = zoo.classifier_name(model)
    tensors = load_file(str(files["head"]))  # the head's tensors under the model's own names ("head.weight")
    model.get_submodule(head).load_state_dict({k.removeprefix(head + "."): v for k, v in tensors.items()})
    return model.eval()


def accuracy(args, files: dict, folder: Path, cuda: bool) -> dict:
    """Section 2: the RLRR adapter and the linear probe, fp32 / fp16 / INT8, on the task's test images."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = zoo.from_adapter(files["adapter"], weights=files["weights"]).eval()
    probe = _probe(files)
    shape = zoo.input_size(adapted, rlrr.read_adapter_file(files["adapter"]).metadata.get("img_size"))
    data = Path(files["data"])
    test = export.read_images(data / "test", adapted, shape)
    train = export.read_images(data / "train", adapted, shape)
    draws = [torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: args.calibration_images] for seed in range(args.draws)]
    calib = list(train.images[draws[0]].split(args.batch))
    what = f"{len(draws[0])} train images of {data.name} (seeded draw 0)"
    out = {"test": test.description, "calibration": what, "rows": {}, "draws": {}}
    for name, model in (("rlrr", adapted), ("linear_probe", probe)):
        plain = export.fold(copy.deepcopy(model)) if rlrr.adapters_of(model) else model
        paths = export_three(plain, shape, folder, name, calib, what)
        rows = _evaluate(_sessions(paths, args.threads, cuda), model, test, args.batch)
        for d in DTYPES:
            rows[f"onnx {d}"]["size_bytes"] = paths[d].stat().st_size
        out["rows"][name] = rows
        out["draws"][name] = [_int8_draw(plain, model, paths["fp32"], folder, train.images[pick], test, args, cuda) for pick in draws]
    spec = export.resolve_spec(None, adapter=files["adapter"], weights=files["weights"])
    cli = export.export_onnx(spec, folder / "cli.int8.onnx", adapter=files["adapter"], dtype="int8", calibration=str(data),
                             calibration_images=args.calibration_images, eval_images=len(test), min_agreement=0.0,
                             latency_runs=args.rounds, warmup=2, batch_sizes=(args.batch,), force=True)
    out["cli_int8"] = {"command": f"python -m export.onnx --adapter {_short(files['adapter'])} --weights BACKBONE --dtype int8 "
                                  f"--calibration {data.name}/ --calibration-images {args.calibration_images} --eval-images {len(test)} "
                                  f"--batch-sizes {args.batch}",
                       "agreement": cli.agreement, "size_vs_fp32": cli.size_bytes / cli.quantization["fp32_size_bytes"],
                       "latency_vs_fp32": cli.latency.ratio if cli.latency else None, "checked_on": cli.quantization["checked_on"]}
    return out


def _short(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def markdown(doc: dict) -> str:
    lines = [f"# Quantized exports (`{doc.get('command', 'python -m benchmarks.quantize').strip()}`, {doc['date']}, {doc.get('wall_s', '?')} s)", ""]
    lat = doc["latency"] or {"model": "not measured (--skip-latency)", "providers": [], "batch": "-", "threads": "-", "rounds": 0,
                             "ratio_vs_fp32": {}, "median_ms": {}, "size_bytes": {}, "size_vs_fp32": {}}
    lines += [f"## Latency and size: {lat['model']}", "",
              f"onnxruntime {doc['versions'].get('onnxruntime')}, {', '.join(lat['providers'])}, batch {lat['batch']}, {lat['threads']} threads, "
              f"{lat['rounds']} rounds (ratios: median of per-round ratios [min-max])", "",
              "| export | median latency (ms) | latency / fp32 | file (MB) | file / fp32 |", "|---|---|---|---|---|"]
    for d in DTYPES if lat["median_ms"] else ():
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
    lines += ["", f"INT8 over {len(next(iter(acc['draws'].values())))} seeded calibration draws of the same size (draw 0 is the row above):", "",
              "| model | test accuracy min-max | agreement min-max |", "|---|---|---|"]
    for name, draws in acc["draws"].items():
        accs, agrees = [d["accuracy"] for d in draws], [d["agreement"] for d in draws]
        lines.append(f"| {name} | {min(accs):.2%}-{max(accs):.2%} | {min(agrees):.2%}-{max(agrees):.2%} |")
    c = acc["cli_int8"]
    lines += ["", f"CLI path (`{c.get('command', 'python -m export.onnx --adapter ... --dtype int8 --calibration DATA')}`): top-1 agreement "
                  f"{c['agreement']['top1']:.2%} ({c['agreement']['agree']}/{c['agreement']['samples']}, {c['checked_on']}), "
                  f"file {c['size_vs_fp32']:.3f} of fp32" + (f", latency {c['latency_vs_fp32']:.3f} of fp32" if c["latency_vs_fp32"] else "") + "."]
    lines += ["", f"## CUDA: {doc['cuda']['note']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits", help="the transfer benchmark's task whose files are used (default %(default)s: the real-image one)")
    p.add_argument("--cache", type=Path, help="the transfer benchmark's cache (default: $RLRR_CACHE/transfer, else ~/.cache/rlrr/transfer)")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--draws", type=int, default=5, help="calibration draws the INT8 agreement is repeated over (default %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-latency", action="store_true", help="only the accuracy section (the committed results have both)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = task_files(args.task, args.cache)
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    doc = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": "python -m benchmarks.quantize " + " ".join(argv or sys.argv[1:]),
           "task": f"{args.task} (the transfer benchmark, docs/transfer.md): adapter {_short(files['adapter'])}, "
                   f"linear probe {_short(files['head'])}, backbone digest {files['backbone_digest'][:12]}",
           "environment": M.environment(), "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        doc["latency"] = None if args.skip_latency else latency(args, folder, cuda=False)
        doc["accuracy"] = accuracy(args, files, folder, cuda=False)
        if has_cuda:
            doc["cuda"] = {"note": "onnxruntime-gpu, CUDA provider (TF32 off)", "latency": latency(args, folder, cuda=True),
                           "accuracy": accuracy(args, files, folder, cuda=True)}
        else:
            doc["cuda"] = {"note": f"not measured: no CUDA provider here (onnxruntime {ort.__version__}, providers "
                                   f"{', '.join(ort.get_available_providers())}, torch.cuda {torch.cuda.is_available()})"}
    doc["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize.json").write_text(json.dumps(doc, indent=2, default=str))
    table = markdown(doc)
    (args.out / "quantize.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
