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
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch

MiB = 2**20


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def load() -> list[float]:
    """1, 5 and 15 minute load averages (the machine has os.cpu_count() cores)."""
    return [round(v, 2) for v in os.getloadavg()]


def _psutil():
    import psutil  # reason: the `bench` extra; the report and the tests import this module without it

    return psutil


def rss_mib() -> float:
    return _psutil().Process().memory_info().rss / MiB


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
        proc = _psutil().Process()
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, proc.memory_info().rss / MiB)
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
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1], "n": len(ratios)}


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device()) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "memory_gib": round(_psutil().virtual_memory().total / 2**30, 1),
    }
