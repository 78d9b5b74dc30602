"""Timing and memory primitives: medians after warm-up, paired ratios, peak RSS, machine load.

The machine is shared and noisy, so every comparison is *interleaved*: one round runs each
variant once, in turn, and a ratio is taken within each round (same load) before the median
over rounds. Wall time is what the targets speak of; process CPU time is reported beside it as
the less load-sensitive witness. Peak memory is the process's peak RSS (`ru_maxrss`), which is
why each variant's memory is measured in a process that runs only that variant.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch

MiB = 2**20


def device(name: str | None = None) -> torch.device:
    """The device a worker measures on: the one named, else CUDA when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def load() -> list[float]:
    """1, 5 and 15 minute load averages (the machine has os.cpu_count() cores)."""
    return [round(v, 2) for v in os.getloadavg()]


def rss_mib() -> float:
    """This process's resident set now (Linux: /proc/self/statm; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
    except OSError:
        import psutil  # reason: the `bench` extra, needed only off Linux

        return psutil.Process().memory_info().rss / MiB


def _memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def minor_faults() -> int:
    """Page faults this process has taken so far: each is a fresh 4 KiB page handed out by the kernel."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_mib() -> float:
    """This process's peak resident set since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Peak RSS inside a `with` block, sampled by a thread (ru_maxrss only knows the process peak)."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s, self.peak_mib = period_s, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "RssSampler":
        self.peak_mib = rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, rss_mib())
            time.sleep(self.period_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())


def timed(fn: Callable[[], object], dev: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, with Python's cyclic GC held off.

    A full collection walks every object of every model in the process (0.3-0.8 s here) and
    would land on whichever variant happens to be running; cycles are collected between calls.
    """
    gc.collect()
    gc.disable()
    try:
        sync(dev)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync(dev)
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        gc.enable()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, dev: torch.device) -> dict[str, dict[str, list[float]]]:
    """Run every fn once per round, in turn (rotating the order), after `warmup` untimed rounds.

    Returns name -> {"wall": [...], "cpu": [...]}, one entry per timed round.
    """
    names = list(fns)
    out = {n: {"wall": [], "cpu": []} for n in names}
    gc.collect()
    gc.freeze()  # the models' objects: later collections (in `timed`) only walk what the steps create
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # no variant always runs first
        for n in order:
            wall, cpu = timed(fns[n], dev)
            if r >= warmup:
                out[n]["wall"].append(wall)
                out[n]["cpu"].append(cpu)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """Median, min and max over rounds of num[i] / den[i] (both measured in the same round)."""
    ratios = sorted(a / b for a, b in zip(num, den))
    q25, _, q75 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "q25": q25, "q75": q75, "n": len(ratios)}


def _cpu_model() -> str:
    """The CPU's model name with its family and model numbers (a VM may show only the vendor's name)."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    detail = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    detail += ["virtual machine"] if "hypervisor" in fields.get("flags", "").split() else []
    return name + (f" ({', '.join(detail)})" if detail else "")


def _blas() -> str:
    """BLAS and CPU kernels torch was built with, as `torch.__config__.show()` says."""
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.-]+)", config)
    onednn = re.search(r"MKL-DNN v([\w.]+)", config)
    parts = [blas.group(1) if blas else "unknown BLAS"] + ([f"MKL {mkl.group(1)}"] if mkl else []) + ([f"oneDNN {onednn.group(1)}"] if onednn else [])
    return ", ".join(parts) + f"; CPU kernels {torch.backends.cpu.get_cpu_capability()}"


def environment(dev: torch.device | None = None) -> dict:
    """The machine a result belongs to: what a reader needs to know before comparing figures."""
    dev = dev or device()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "blas": _blas(),
        "device": str(dev) + (f" ({gpu}, CUDA {torch.version.cuda})" if gpu else ""),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
    }


def machine_line(env: dict) -> str:
    """One line that names the machine, printed before and with every result."""
    return (f"{env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; {env['device']}; torch {env['torch']} "
            f"({env.get('blas', 'BLAS not recorded')}); Python {env['python']}; {env['threads']} threads")
