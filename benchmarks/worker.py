"""Run one benchmark task in this process: `python -m benchmarks.worker '<json spec>' OUT.json`.

The spec is {"task": name, "threads": n, "kernels": backend or None, **kwargs}. The result (or
the error) is written to OUT.json.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings


def run(spec: dict) -> dict:
    """The task's result, {"ok": True, ...}, or {"ok": False, "error": ...}: never raises."""
    spec = dict(spec)
    import torch

    torch.set_num_threads(spec.pop("threads"))
    warnings.filterwarnings("ignore")  # fx/ONNX chatter would drown the progress log
    from benchmarks import variants
    from benchmarks.tasks import TASKS

    variants.RLRR_KERNELS = spec.pop("kernels", variants.RLRR_KERNELS)
    name = spec.pop("task")
    try:
        return {"ok": True, **TASKS[name](**spec)}
    except Exception as e:  # reported in the results, not fatal to the whole run
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def main(argv: list[str]) -> int:
    spec, out = json.loads(argv[0]), argv[1]
    result = run(spec)
    with open(out, "w") as f:
        json.dump(result, f)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
