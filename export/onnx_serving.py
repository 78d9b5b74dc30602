"""ONNX for serving many tasks from one base model.

- The routed graph: inputs `input` (N, C, H, W) and `task` (N,) int64; `rlrr.TaskRouter` exported
  as it is. Its two guards get names an onnxruntime error can be read by: `task_index_check`
  (a Gather that refuses a task index outside 0..K-1) and `task_batch_check` (a Concat that
  refuses a `task` whose length is not the batch).
- The adapter-inputs graph: the unmerged model with its adapter tensors and head as graph inputs
  named `adapter.<site>.<param>` and `trained.<head>.weight|bias` (the keys of an adapter file),
  each also an initializer holding its default (ONNX: an initializer of an input's name is its
  default, so onnxruntime does not require it fed). One `.onnx_adapter` per task
  (`onnxruntime.AdapterFormat`) holds that task's tensors under those names: a server loads it
  with `onnxruntime.LoraAdapter` and activates it per run with `RunOptions.add_active_adapter`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from export.errors import ExportError, VerificationError
from export.files import data_path
from export.onnx import _summary, unsupported_op
from export.verify import make_session

TASK_CHECK, BATCH_CHECK = "task_index_check", "task_batch_check"
METADATA_KEY = "rlrr.tasks"  # metadata_props entry: JSON list of {name, index, classes}


def torch_export(module: nn.Module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
                 dynamic_shapes: tuple, opset: int, external: bool) -> list[Path]:
    """`torch.onnx.export` (dynamo) of `module` on `args`; the files written (model, data file if any)."""
    try:
        torch.onnx.export(module, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes, external_data=external,
                          opset_version=opset, input_names=input_names, output_names=output_names, verbose=False)
    except Exception as e:  # the exporter raises many kinds; all mean "this model did not export"
        op = unsupported_op(e)
        what = f"op {op} has no ONNX translation at opset {opset}" if op else _summary(e)
        raise ExportError(f"torch.onnx cannot export {type(module).__name__}: {what}") from e
    return [path] + ([data_path(path)] if data_path(path).exists() else [])


def _load(path: Path):
    import onnx

    return onnx.load(str(path))  # external data too, if any


def _save(model, path: Path, external: bool) -> None:
    import onnx

    if external:
        data_path(path).unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_path(path).name)
    else:
        onnx.save_model(model, str(path))


def mark_routed(path: Path, tasks: Sequence[dict], external: bool) -> None:
    """Name the routed graph's guards and record the tasks (name, index, classes) in its metadata."""
    model = _load(path)
    graph = model.graph
    made_from_task = {o for n in graph.node if "task" in n.input for o in n.output}
    index_check = next((n for n in graph.node if n.op_type == "Gather" and n.input and n.input[0] == "task_ids"), None)
    batch_check = next((n for n in graph.node if n.op_type == "Concat" and made_from_task & set(n.input)), None)
    if index_check is None or batch_check is None:
        raise ExportError("the routed graph lost its task guards (no Gather on task_ids or Concat on task): refusing to write it")
    index_check.name, batch_check.name = TASK_CHECK, BATCH_CHECK
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(list(tasks))
    _save(model, path, external)


def add_defaults(path: Path, defaults: dict[str, np.ndarray], tasks: Sequence[dict], external: bool) -> None:
    """Give each adapter input an initializer of its name holding its default, and record the tasks."""
    from onnx import numpy_helper

    model = _load(path)
    inputs = {i.name for i in model.graph.input}
    missing = sorted(set(defaults) - inputs)
    if missing:
        raise ExportError(f"the exported graph lacks the adapter inputs {missing[:5]}")
    model.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in defaults.items())
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(list(tasks))
    _save(model, path, external)


def write_onnx_adapter(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One task's tensors as an `.onnx_adapter` file (onnxruntime.AdapterFormat), named as the graph's inputs."""
    import onnxruntime as ort

    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}  # alive until written
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(path))


class WithAdapterInputs(nn.Module):
    """`model(x)` with some of its parameters taken from extra inputs (`torch.func.functional_call`).

    Exported, those parameters are graph inputs rather than initializers, so the exporter cannot
    fold the adapters into the weights: the graph computes W' from them on every run.
    """

    def __init__(self, model: nn.Module, parameter_names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.parameter_names = model, list(parameter_names)

    def forward(self, x: Tensor, *tensors: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.parameter_names, tensors)), (x,))


class RoutedRunner:
    """An onnxruntime session on a routed file."""

    def __init__(self, path: Path, provider: str) -> None:
        self.session = make_session(str(path), provider)
        self.providers, self.note = self.session.providers, self.session.note

    def run(self, x: Tensor, task: Tensor) -> np.ndarray:
        try:
            return self.session.session.run(None, {"input": x.detach().cpu().numpy(), "task": task.detach().cpu().numpy()})[0]
        except Exception as e:  # onnxruntime's own exception types are not importable portably
            raise VerificationError(f"onnxruntime cannot run the routed model on input {tuple(x.shape)}: {type(e).__name__}: {e}") from e


class AdapterRunner:
    """An onnxruntime session on an adapter-inputs file; each run with one `.onnx_adapter` active, or none."""

    def __init__(self, path: Path, provider: str) -> None:
        self.session = make_session(str(path), provider)
        self.providers, self.note = self.session.providers, self.session.note
        self._options: dict[str, object] = {}

    def options(self, adapter: Path | None):
        import onnxruntime as ort

        if adapter is None:
            return None
        key = str(adapter)
        if key not in self._options:
            loaded = ort.LoraAdapter()
            loaded.Load(key)
            options = ort.RunOptions()
            options.add_active_adapter(loaded)
            self._options[key] = (options, loaded)  # the adapter must outlive the options
        return self._options[key][0]

    def run(self, x: Tensor, adapter: Path | None) -> np.ndarray:
        try:
            return self.session.session.run(None, {"input": x.detach().cpu().numpy()}, self.options(adapter))[0]
        except Exception as e:
            raise VerificationError(f"onnxruntime cannot run the base file with adapter {adapter}: {type(e).__name__}: {e}") from e


def graph_inputs(path: Path) -> list[dict]:
    """The graph's inputs: name and shape (symbolic dims by name), for the report."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [{"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]} for i in model.graph.input]
