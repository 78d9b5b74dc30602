"""What one worker process measures. Each task returns a JSON-able dict; `benchmarks.worker` runs one.

- `train_timing`: every training variant of one model in one process, steps interleaved.
- `floor_ratio`: the target rows' three variants (the floor, full fine-tuning, RLRR) alone, many rounds.
- `own_work`: the time inside RLRR's training kernels per step, native loops vs op by op.
- `train_memory`: one variant only, so the process's peak RSS is that variant's.
- `gemm_floor`: the adapted linears' GEMMs alone, with and without the weight-gradient GEMM, and the
  clocked reads of every W between them (the least a rescale outside the GEMMs adds).
- `inference`: base, RLRR unmerged (eval, cached W'), the same recomputing W' per call, folded.
- `onnx`: onnxruntime, base vs folded ONNX files.
- `big_apply_fold` / `big_onnx`: `apply`, `fold` and the ONNX export of ViT-H/14, with peak RSS.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import rlrr
from benchmarks import measure as M
from benchmarks import variants as V

BATCH = 8
IMG = 224


def _data(dev: torch.device, batch: int = BATCH, model: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = V.IMAGE_SIZE.get(model, IMG)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, V.NUM_CLASSES, (batch,), generator=g)
    return x.to(dev), y.to(dev)


def _autocast(dev: torch.device, amp: str | None):
    """bf16/fp16 autocast on `dev` when `amp` names a dtype, else nothing."""
    return torch.autocast(dev.type, dtype=getattr(torch, amp)) if amp else contextlib.nullcontext()


class Trainer:
    """One training step (forward, backward, AdamW step) of one variant, timed by phase.

    Without an optimizer (the floor, full fine-tuning's forward + backward) the gradients are
    dropped as `zero_grad(set_to_none=True)` would. Page faults are counted per step: on CPU a
    freshly allocated tensor of a few MiB is fresh pages from the kernel, one fault per 4 KiB.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, dev: torch.device, optimizer: bool = True, amp: str | None = None) -> None:
        self.model, self.x, self.y, self.dev, self.amp = model.train(), x, y, dev, amp
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4) if optimizer else None
        self.phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        self.faults: list[int] = []

    def step(self) -> None:
        faults = M.minor_faults()
        t0 = time.perf_counter()
        with _autocast(self.dev, self.amp):
            loss = F.cross_entropy(self.model(self.x), self.y)
        M.sync(self.dev)
        t1 = time.perf_counter()
        loss.backward()
        M.sync(self.dev)
        t2 = time.perf_counter()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            for p in self.params:
                p.grad = None
        M.sync(self.dev)
        t3 = time.perf_counter()
        self.faults.append(M.minor_faults() - faults)
        for name, dt in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2)):
            self.phases[name].append(dt)


def _trainer(model: str, variant: str, dev: torch.device, batch: int, amp: str | None) -> Trainer:
    x, y = _data(dev, batch, model)
    net = V.TRAIN_VARIANTS[variant](V.build(model).to(dev))
    return Trainer(net, x, y, dev, optimizer=variant not in V.NO_OPTIMIZER, amp=amp)


def train_timing(model: str, variants: list[str], rounds: int, warmup: int, device: str | None = None, batch: int = BATCH,
                 amp: str | None = None) -> dict:
    dev = M.device(device)
    trainers = {v: _trainer(model, v, dev, batch, amp) for v in variants}
    load_before = M.load()
    times = M.interleaved({v: t.step for v, t in trainers.items()}, rounds, warmup, dev)
    out = {"model": model, "device": str(dev), "batch": batch, "amp": amp, "rounds": rounds, "warmup": warmup, "load_before": load_before,
           "load_after": M.load(), "variants": {}}
    for v, t in trainers.items():
        phases = {k: M.median(vals[warmup:]) for k, vals in t.phases.items()}
        out["variants"][v] = {
            "trainable_params": V.trainable_parameters(t.model),
            "wall": times[v]["wall"],
            "cpu": times[v]["cpu"],
            "median_s": M.median(times[v]["wall"]),
            "median_cpu_s": M.median(times[v]["cpu"]),
            "phases_s": phases,
            "faults_per_step": M.median(t.faults[warmup:]),
        }
    return out


#: The variants behind the step-time targets: the floor, full fine-tuning and RLRR.
FLOOR_VARIANTS = ["full_fwd_bwd", "full", "rlrr"]


def floor_ratio(model: str, rounds: int, warmup: int, device: str | None = None, batch: int = BATCH, amp: str | None = None) -> dict:
    """`train_timing` of the floor, full fine-tuning and RLRR alone, for many rounds.

    A round is then three steps instead of a dozen, so sixty fit where ten did. On the 2-core VM of
    results/zen3 a steady GEMM's speed wandered by ±16 % from one second to the next; there and in
    the committed results the middle half of RLRR's per-round ratios to the floor spans 0.09–0.13
    (ViT-S, 60 rounds): a median of ten such ratios is good to about ±4 %, of sixty to about ±1.6 %
    (1.25 σ/√n). The step-time targets against the floor and full fine-tuning take their ratios
    from here when it ran.
    """
    return train_timing(model, FLOOR_VARIANTS, rounds, warmup, device, batch, amp)


def own_work(model: str, rounds: int, warmup: int, device: str | None = None, batch: int = BATCH) -> dict:
    """RLRR's own work per step: the time inside its training kernels (W' and the scale gradients).

    The native loops ("rlrr") and op by op ("rlrr_eager"), stepped in turn as in `train_timing`;
    each kernel call is timed, so this isolates what the step ratios measure through the noise of
    a whole step. The Function's other Python (a few µs a call) and the GEMMs are outside it.
    """
    from adapters import EAGER, NATIVE  # reason: the kernels to clock; only this task wraps them

    dev = M.device(device)
    trainers = {v: _trainer(model, v, dev, batch, None) for v in ("rlrr", "rlrr_eager")}
    spent: dict[str, list[float]] = {v: [] for v in trainers}
    inside = [0.0]

    def step(variant: str) -> None:
        before = inside[0]
        trainers[variant].step()
        spent[variant].append(inside[0] - before)

    load_before = M.load()
    clocked = [(kernels, name) for kernels in (NATIVE, EAGER) for name in ("weight", "weight_and_grads")]
    for kernels, name in clocked:  # on the instances, so the class's methods come back afterwards
        setattr(kernels, name, _clocked(getattr(kernels, name), inside))
    try:
        times = M.interleaved({v: (lambda v=v: step(v)) for v in trainers}, rounds, warmup, dev)
    finally:
        for kernels, name in clocked:
            delattr(kernels, name)
    out = {"model": model, "device": str(dev), "batch": batch, "rounds": rounds, "warmup": warmup, "load_before": load_before,
           "load_after": M.load(), "native_failed": NATIVE.failed, "variants": {}}
    for v in trainers:
        kernel = spent[v][warmup:]
        out["variants"][v] = {"kernel_s": kernel, "wall": times[v]["wall"], "median_kernel_s": M.median(kernel),
                              "median_s": M.median(times[v]["wall"]),
                              "share": M.median([k / w for k, w in zip(kernel, times[v]["wall"])])}
    return out


def _clocked(fn, total: list[float]):
    """`fn`, adding the seconds each call takes to total[0]."""

    def clocked(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t

    return clocked


def train_memory(model: str, variant: str, steps: int, device: str | None = None, batch: int = BATCH, amp: str | None = None) -> dict:
    dev = M.device(device)
    rss_start = M.rss_mib()
    trainer = _trainer(model, variant, dev, batch, amp)  # PEFT's import counts here, for LoRA
    rss_built = M.rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        cuda_base = torch.cuda.memory_allocated(dev)
    walls = [M.timed(trainer.step, dev)[0] for _ in range(steps)]
    out = {
        "model": model, "variant": variant, "device": str(dev), "steps": walls, "load": M.load(),
        "rss_start_mib": rss_start, "rss_built_mib": rss_built, "peak_rss_mib": M.peak_rss_mib(),
        "saved_mib": saved_for_backward(trainer) / M.MiB,
    }
    out["growth_mib"] = out["peak_rss_mib"] - rss_built
    if dev.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / M.MiB
        out["cuda_growth_mib"] = (torch.cuda.max_memory_allocated(dev) - cuda_base) / M.MiB
    return out


def saved_for_backward(trainer: Trainer) -> int:
    """Bytes autograd keeps from forward to backward, parameters excluded (each storage once).

    Unlike peak RSS this does not depend on how the allocator reuses freed blocks: it is the
    activation memory a method needs, and where a materialised W' shows up.
    """
    model = trainer.model
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(trainer.dev, trainer.amp):
        loss = F.cross_entropy(model(trainer.x), trainer.y)
    del loss
    return sum(seen.values())


def gemm_floor(model: str, rounds: int, warmup: int, device: str | None = None, batch: int = BATCH) -> dict:
    """The adapted linears' GEMMs of one step at the model's real shapes, alone, stepped in turn.

    - "dense": forward + dX (what LoRA's frozen base layers cost);
    - "with_dw": adds the weight-gradient GEMM dYᵀX that full fine-tuning and RLRR both need;
    - "with_dw_read": adds one read of every W (a sum) before its forward GEMM and one before its
      backward, each clocked: "read_s" per step is the least a method adds that rescales W outside
      the GEMMs, as RLRR does once per direction (docs/performance.md). The GEMM before each read
      leaves the caches full of its own operands, as in the model;
    - "model_floor": the whole model's forward + backward, every parameter training (full
      fine-tuning without its optimizer, the floor), so each figure above is also a share of the
      step timed in the same rounds (the machine's speed wanders from minute to minute).
    """
    dev = M.device(device)
    base = V.build(model).to(dev)
    layers = [m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2")]
    tokens = batch * (base.patch_embed.num_patches + 1)
    xs = {id(m): torch.randn(tokens, m.in_features, device=dev, requires_grad=True) for m in layers}
    reads: list[float] = []
    floor = Trainer(base, *_data(dev, batch, model), dev, optimizer=False)  # the floor variant's step, as train_timing runs it

    def floor_step() -> None:
        for p in floor.params:
            p.requires_grad_(True)  # (`run` freezes the layers' weights)
        floor.step()

    def read(w: torch.Tensor) -> float:
        t = time.perf_counter()
        w.detach().sum()
        M.sync(dev)
        return time.perf_counter() - t

    def run(with_dw: bool, clock: bool = False) -> None:
        spent = 0.0
        for m in layers:
            params = [p for p in (m.weight, m.bias) if p is not None]
            for p in params:
                p.requires_grad_(with_dw)
            x = xs[id(m)]
            spent += read(m.weight) if clock else 0.0
            y = F.linear(x, m.weight, m.bias)
            spent += read(m.weight) if clock else 0.0
            y.backward(torch.ones_like(y))
            for t in (*params, x):
                t.grad = None
        if clock:
            reads.append(spent)

    steps = {"dense": lambda: run(False), "with_dw": lambda: run(True), "with_dw_read": lambda: run(True, clock=True), "model_floor": floor_step}
    times = M.interleaved(steps, rounds, warmup, dev)
    return {"model": model, "layers": len(layers), "tokens": tokens, "rounds": rounds, "load": M.load(),
            "read_s": M.median(reads[warmup:]), "reads": reads[warmup:],
            **{k: {"median_s": M.median(v["wall"]), "wall": v["wall"]} for k, v in times.items()}}


def _inference_models(model: str, dev: torch.device) -> dict[str, nn.Module]:
    from export import fold

    base = V.build(model).to(dev).eval()
    unmerged = V.rlrr_paper(copy.deepcopy(base)).eval()
    with torch.no_grad():  # random, non-trivial adapters: the paper's init plus non-zero shifts
        for a in rlrr.adapters_of(unmerged):
            for n, p in a.named_parameters():
                if "shift" in n:
                    p.normal_(0.0, 0.02)
    recomputing = copy.deepcopy(unmerged).train()  # train mode: the cache is off, W' recomputed per call
    folded = fold(copy.deepcopy(unmerged)).eval()
    return {"base": base, "rlrr_unmerged": unmerged, "rlrr_unmerged_recomputed": recomputing, "rlrr_folded": folded}


def _no_tf32():
    """TF32 off for a correctness check on CUDA (its 10-bit mantissa would be the error measured)."""
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    stack.callback(lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", old[0]), setattr(torch.backends.cudnn, "allow_tf32", old[1])))
    return stack


def inference(model: str, rounds: int, warmup: int, device: str | None = None, batch: int = BATCH, amp: str | None = None) -> dict:
    dev = M.device(device)
    x, _ = _data(dev, batch, model)
    models = _inference_models(model, dev)
    with torch.no_grad():
        with _no_tf32():  # float32, no autocast: the fold's own error
            ref = models["rlrr_unmerged"](x)
            err = (models["rlrr_folded"](x) - ref).abs().max().item() / ref.abs().max().item()
        load_before = M.load()
        with _autocast(dev, amp):
            times = M.interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, rounds, warmup, dev)
    return {"model": model, "device": str(dev), "batch": batch, "amp": amp, "rounds": rounds, "load_before": load_before, "load_after": M.load(),
            "fold_max_rel_err": err, "variants": {k: {"median_s": M.median(v["wall"]), **v} for k, v in times.items()}}


def onnx(model: str, rounds: int, warmup: int, batch: int = BATCH) -> dict:
    """onnxruntime, base vs folded, float32; its CUDA provider first where onnxruntime-gpu has one (TF32 off)."""
    import onnxruntime as ort

    dev = torch.device("cpu")  # the export runs on CPU; onnxruntime picks its own provider below
    x, _ = _data(dev, batch, model)
    models = _inference_models(model, dev)
    available = ort.get_available_providers()
    providers = ([("CUDAExecutionProvider", {"use_tf32": 0})] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    out: dict = {"model": model, "batch": batch, "rounds": rounds, "variants": {}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ref = models["rlrr_unmerged"](x).numpy()
        for name in ("base", "rlrr_folded"):
            path = Path(tmp) / f"{name}.onnx"
            t = time.perf_counter()
            torch.onnx.export(models[name], (x,), str(path), dynamo=True, external_data=False)
            export_s = time.perf_counter() - t
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            sessions[name] = ort.InferenceSession(str(path), opts, providers=providers)
            out["variants"][name] = {"export_s": export_s, "file_mib": path.stat().st_size / M.MiB, "provider": sessions[name].get_providers()[0]}
        out["same_graph"] = _graph_signature(Path(tmp) / "base.onnx") == _graph_signature(Path(tmp) / "rlrr_folded.onnx")
        feed = {sessions["base"].get_inputs()[0].name: x.numpy()}
        got = sessions["rlrr_folded"].run(None, feed)[0]
        out["folded_vs_unmerged_max_rel_err"] = float(abs(got - ref).max() / abs(ref).max())
        out["load_before"] = M.load()
        times = M.interleaved({k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}, rounds, warmup, dev)
        out["load_after"] = M.load()
    for k, v in times.items():
        out["variants"][k] |= {"median_s": M.median(v["wall"]), **v}
    return out


def _graph_signature(path: Path) -> tuple:
    """The ONNX graph's operators in order and its initializers' shapes: equal for two files means
    onnxruntime runs the same computation on different numbers."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return tuple(n.op_type for n in g.node), tuple(sorted((tuple(i.dims), i.data_type) for i in g.initializer))


def big_apply_fold(model: str, rounds: int = 5, copies: int = 3) -> dict:
    """`apply` (the paper's placement) and `fold` on a big model, `rounds` times: time and peak RSS.

    Each round applies (random adapters, so the fold is not trivial), folds, then times the
    yardstick: one copy of every parameter into buffers allocated (and touched) beforehand, the
    fastest of `copies`. A round's ratio is its apply + fold over its own yardstick (memory speed
    on a shared machine moves by ±30 % between minutes); the median round is reported, with the
    first (cold: imports, the native loop's load) and the range beside it. A fresh-memory clone would
    time page faults instead (seconds here for 2.4 GiB).
    """
    from export import fold

    t = time.perf_counter()
    net = V.build(model)
    build_s = time.perf_counter() - t
    fp32_mib = sum(p.numel() for p in net.parameters()) * 4 / M.MiB
    out = {"model": model, "params": sum(p.numel() for p in net.parameters()), "fp32_mib": fp32_mib, "build_s": build_s,
           "rss_built_mib": M.rss_mib(), "load_before": M.load()}
    out["rounds"] = []
    for _ in range(rounds):
        r = {}
        with M.RssSampler() as s_apply:
            t = time.perf_counter()
            V.rlrr_paper(net)
            r["apply_s"] = time.perf_counter() - t
        with torch.no_grad():
            for adapter in rlrr.adapters_of(net):
                for p in adapter.parameters():
                    p.uniform_(-0.01, 0.01)
        with M.RssSampler() as s_fold:
            t = time.perf_counter()
            fold(net)
            r["fold_s"] = time.perf_counter() - t
        params = [p.detach() for p in net.parameters()]
        buffers = [torch.zeros_like(p) for p in params]  # zeros: the pages are touched now, not during the timed copies
        r["copy_s"] = []
        for _ in range(copies):
            t = time.perf_counter()
            for b, p in zip(buffers, params):
                b.copy_(p)
            r["copy_s"].append(time.perf_counter() - t)
        r |= {"apply_peak_rss_mib": s_apply.peak_mib, "fold_peak_rss_mib": s_fold.peak_mib,
              "apply_fold_copies": (r["apply_s"] + r["fold_s"]) / min(r["copy_s"])}
        out["rounds"].append(r)
        del params, buffers  # (freed: the next round's peaks are the model's)
    ratios = [r["apply_fold_copies"] for r in out["rounds"]]
    median = sorted(out["rounds"], key=lambda r: r["apply_fold_copies"])[(rounds - 1) // 2]
    out |= {k: median[k] for k in ("apply_s", "fold_s", "copy_s", "apply_fold_copies")}
    out |= {"apply_fold_copies_first": ratios[0], "apply_fold_copies_min": min(ratios), "apply_fold_copies_max": max(ratios),
            "process_peak_rss_mib": M.peak_rss_mib(), "load_after": M.load()}
    out["apply_fold_s"] = out["apply_s"] + out["fold_s"]
    out["apply_peak_rss_mib"] = max(r["apply_peak_rss_mib"] for r in out["rounds"])
    out["fold_peak_rss_mib"] = max(r["fold_peak_rss_mib"] for r in out["rounds"])
    out["apply_fold_peak_over_fp32"] = max(out["apply_peak_rss_mib"], out["fold_peak_rss_mib"]) / fp32_mib
    return out


def big_onnx(model: str) -> dict:
    """The folded big model's ONNX export (external data: > 2 GB), time, peak RSS and files."""
    from export import fold

    net = fold(V.rlrr_paper(V.build(model))).eval()
    x, _ = _data(torch.device("cpu"), batch=1)
    out = {"model": model, "export_rss_before_mib": M.rss_mib(), "export_load_before": M.load()}
    with tempfile.TemporaryDirectory() as tmp, M.RssSampler() as s, torch.no_grad():
        path = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        torch.onnx.export(net, (x,), str(path), dynamo=True, external_data=True)
        out["export_s"] = time.perf_counter() - t
        out["export_files_mib"] = sum(f.stat().st_size for f in Path(tmp).iterdir()) / M.MiB
    out |= {"export_peak_rss_mib": s.peak_mib, "export_load_after": M.load()}
    return out


TASKS = {f.__name__: f for f in (train_timing, floor_ratio, own_work, train_memory, gemm_floor, inference, onnx, big_apply_fold, big_onnx)}
