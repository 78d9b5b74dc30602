"""Serve many tasks from one base model: each batch row computed with its own task's adapter.

A task is an `AdapterSet`: a few vectors per site and, usually, its own head. `TaskRouter(model,
tasks)` stacks each site's tensors over the K tasks (K, ...) and reroutes every adapted site of
the *unadapted* base model so that row n computes task[n]'s function, through the shared weights:

    linear (RLRR)   y = W'_t x + b + f_t, W'_t never formed   adapters.linear_rows: 2 GEMMs at rank 1
    conv2d (RLRR)   the same through im2col                   adapters.conv2d_rows
    norm, SSF       y = s_t ⊙ y + t_t on the module's output  adapters.scale_shift_rows
    head            the task's own head, its columns past the task's class count set to -inf

`router(x, task)` runs the model (task: (N,) int64 indices into `tasks`), and exports to ONNX as
it is (`export.multitask`). `per_sample(model, names)` does the same over a model's named
adapters, eagerly. A site that sees a multiple of N rows (Swin's windows: (N·windows, tokens, C),
batch-major) gives each sample's rows its task; any other batch is refused. Task indices are
checked: a clear RoutingError in eager PyTorch; in an exported graph an index outside 0..K-1
reaches a Gather that refuses it (ONNX's Gather wraps negative indices, so they are moved out of
its range first), and a `task` whose length differs from the batch reaches a Concat that refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adapters import ADAPTER_PREFIX, conv2d_rows, linear_rows, scale_shift_rows
from rlrr.adapter_file import AdapterSet
from rlrr.errors import AdapterMismatchError, ConfigError, RoutingError
from rlrr.inject import build_adapter
from rlrr.multi import active_adapters, disable_adapters, get_adapter, set_active
from rlrr.rewrite import adapters_of
from rlrr.sites import Site
from rlrr.state import fit_sites

PAD = float("-inf")  # logits of the columns past a task's class count: argmax and softmax stay right


def check_same_placement(tasks: Sequence[AdapterSet], sources: Sequence[str]) -> None:
    """Adapters that can share one routed model: the same options (init aside) and the same sites.

    AdapterMismatchError names the first pair that differs and how.
    """
    first, where = tasks[0], sources[0]
    fixed = {k: v for k, v in first.config.to_dict().items() if k != "init"}
    sites = {s.name: (s.kind, tuple(s.shape), s.method, s.chunks) for s in first.sites}
    for task, source in zip(tasks[1:], sources[1:]):
        theirs = {k: v for k, v in task.config.to_dict().items() if k != "init"}
        changed = sorted(k for k in fixed if fixed[k] != theirs.get(k))
        if changed:
            raise AdapterMismatchError(f"{source} and {where} use different RLRR options: "
                                       + ", ".join(f"{k} {theirs.get(k)!r} vs {fixed[k]!r}" for k in changed))
        other = {s.name: (s.kind, tuple(s.shape), s.method, s.chunks) for s in task.sites}
        differ = sorted(n for n in set(sites) | set(other) if sites.get(n) != other.get(n))
        if differ:
            said = [f"{n}: {other.get(n) or 'absent'} vs {sites.get(n) or 'absent'}" for n in differ[:4]]
            raise AdapterMismatchError(f"{source} and {where} adapt different sites ({len(differ)} differ, as (kind, shape, method, chunks)): "
                                       + "; ".join(said))


@dataclass(frozen=True)
class _Route:
    """How one site is computed per row: which module, which form, which stacked tensors."""

    site: Site
    form: str  # "linear", "conv", "scale last" (channels last) or "scale 1" (channels first)
    index: int  # position in TaskRouter.tables


def _form(site: Site, owner: nn.Module) -> tuple[str | None, str]:
    """The per-row form of a site, or None and why it has none."""
    if site.method == "ssf":
        if site.op == "nn.Linear" and isinstance(owner, nn.Linear):
            return "scale last", ""
        if site.op.startswith("nn.Conv") and isinstance(owner, nn.modules.conv._ConvNd):
            return "scale 1", ""
        return None, f"SSF read by {site.op}"
    if site.kind == "norm":
        if not isinstance(owner, nn.LayerNorm):
            return None, f"a norm read by {site.op} inside {type(owner).__name__}, not a LayerNorm module"
        return ("scale 1" if "2d" in type(owner).__name__.lower() else "scale last"), ""  # timm's LayerNorm2d is channels-first
    if site.kind == "linear":
        if site.op == "nn.Linear" and site.weight == "weight" and isinstance(owner, nn.Linear):
            return "linear", ""
        return None, f"a linear weight read by {site.op}, not an nn.Linear call"
    if site.op == "nn.Conv2d" and isinstance(owner, nn.Conv2d):
        why = ("groups > 1" if owner.groups != 1 else f"padding mode {owner.padding_mode!r}" if owner.padding_mode != "zeros"
               else "padding='same'" if owner.padding == "same" else "")
        return (None, f"a Conv2d with {why}") if why else ("conv", "")
    return None, f"a {site.kind} read by {site.op}"


class _Table(nn.Module):
    """One site's adapter tensors stacked over the tasks: buffers (K, *shape), named without the prefix."""

    def __init__(self, stacks: dict[str, Tensor]) -> None:
        super().__init__()
        for name, value in stacks.items():
            self.register_buffer(name, value)

    def rows(self, name: str, task: Tensor) -> Tensor | None:
        table = self._buffers.get(name)
        return None if table is None else torch.index_select(table, 0, task)


class _RoutedHead(nn.Module):
    """Stands in for the classifier while routing: each row through its task's head (the tensors live in the router)."""

    def __init__(self, router: TaskRouter) -> None:
        super().__init__()
        self._router = (router,)  # a tuple: the router is not a submodule of the model it wraps

    def forward(self, x: Tensor) -> Tensor:
        return self._router[0].head_rows(x)


class TaskRouter(nn.Module):
    """The base `model` serving `tasks` per row: `router(x, task)` -> the output, padded to the widest head.

    `tasks[k]` is an AdapterSet, or None for the base model with the model's own head. All sets
    must share options and sites (`check_same_placement`). `head` names the classifier module
    (default: the one module whose full tensors the sets carry); each task's head is its set's
    trained head, else the model's. The model must carry no live adapter; it is hooked until
    `remove()` (or the end of a `with` block), and its weights are never changed.
    """

    def __init__(self, model: nn.Module, tasks: Sequence[AdapterSet | None], *, head: str | None = None,
                 sources: Sequence[str] | None = None) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("a TaskRouter needs at least one task")
        if adapters_of(model):
            raise RoutingError(f"{type(model).__name__} carries a live RLRR adapter: routing needs the base model "
                               "(rlrr.disable_adapters(model), or rlrr.per_sample, which does it for you)")
        sources = list(sources or [f"task {k}" for k in range(len(tasks))])
        named = [(t, s) for t, s in zip(tasks, sources) if t is not None]
        if named:
            check_same_placement([t for t, _ in named], [s for _, s in named])
        self.model = model
        self.num_tasks = len(tasks)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.register_buffer("task_ids", torch.arange(len(tasks), device=device))  # the Gather that checks task indices
        self._task: Tensor | None = None
        self._hooks: list = []
        self._forwards: list[tuple[nn.Module, object]] = []  # (module, its own instance-level forward or None)
        self.routes: list[_Route] = []
        self.tables = nn.ModuleList()
        self.config = named[0][0].config if named else None
        if named:
            self._stack_sites(tasks, named[0])
        self.head_name, self.classes = self._stack_heads(tasks, sources, head)
        self._hook()

    # --- building -----------------------------------------------------------------------------

    def _stack_sites(self, tasks: Sequence[AdapterSet | None], first: tuple[AdapterSet, str]) -> None:
        sites = fit_sites(self.model, first[0], first[1])  # the model's own sites (which op reads each weight), checked
        refused = []
        for site in sites:
            owner = self.model.get_submodule(site.module)
            form, why = _form(site, owner)
            if form is None:
                refused.append(f"{site.name} ({why})")
                continue
            weight = getattr(owner, site.weight)
            identity = build_adapter(site, weight, self.config)  # its identity values: the base model's rows
            identity.reset_parameters("identity")
            stacks = {}
            for pname, value in identity.named_parameters(recurse=False):
                rows = [value.detach() if t is None else t.tensors[f"{site.name}.{pname}"] for t in tasks]
                stacks[pname[len(ADAPTER_PREFIX):]] = torch.stack([r.to(weight.device, weight.dtype) for r in rows])
            self.routes.append(_Route(site, form, len(self.tables)))
            self.tables.append(_Table(stacks))
        if refused:
            self.routes, self.tables = [], nn.ModuleList()
            raise RoutingError(f"per-sample routing has no per-row form for {len(refused)} site(s): " + "; ".join(refused[:8])
                               + ("; ..." if len(refused) > 8 else "") + ". Serve such models one task per file (fold each adapter)")

    def _stack_heads(self, tasks: Sequence[AdapterSet | None], sources: list[str], head: str | None) -> tuple[str | None, list[int]]:
        owners = {n.rpartition(".")[0] for t in tasks if t is not None for n in t.trained}
        head = head if head is not None else (owners.pop() if len(owners) == 1 else None)
        if head is None and owners:
            raise RoutingError(f"the tasks train full tensors of several modules {sorted(owners)[:5]}: per-sample routing "
                               "takes a per-task classifier head only; name it with head=")
        if head is None:
            return None, []
        module = self.model.get_submodule(head)
        if not isinstance(module, nn.Linear):
            raise RoutingError(f"the head {head!r} is a {type(module).__name__}: per-sample routing gathers nn.Linear heads")
        weights, biases = [], []
        for task, source in zip(tasks, sources):
            trained = {} if task is None else task.trained
            other = sorted(n for n in trained if n.rpartition(".")[0] != head)
            if other:
                raise RoutingError(f"{source} holds full tensors {other[:5]} outside the head {head!r}: per-sample routing "
                                   "takes a per-task classifier head only")
            w = trained.get(f"{head}.weight", module.weight).detach()
            b = trained.get(f"{head}.bias", module.bias if module.bias is not None else torch.zeros(w.shape[0])).detach()
            if w.dim() != 2 or w.shape[1] != module.in_features or tuple(b.shape) != (w.shape[0],):
                raise AdapterMismatchError(f"{source}: head {head!r} tensors {tuple(w.shape)}, {tuple(b.shape)} do not fit "
                                           f"a head reading {module.in_features} features")
            weights.append(w)
            biases.append(b)
        classes = [w.shape[0] for w in weights]
        factory = {"dtype": module.weight.dtype, "device": module.weight.device}
        device = factory["device"]
        # every task's rows once, one after the other (no padding stored): task k's are rows offset[k] ..
        self.register_buffer("head_weight", torch.cat(weights).to(**factory))  # (Σ classes, features)
        self.register_buffer("head_bias", torch.cat(biases).to(**factory))  # (Σ classes,)
        self.register_buffer("head_offset", torch.tensor([0, *classes[:-1]], device=device).cumsum(0))  # (K,)
        self.register_buffer("head_classes", torch.tensor(classes, device=device))  # (K,)
        return head, classes

    def _hook(self) -> None:
        for route in self.routes:
            owner = self.model.get_submodule(route.site.module)
            if route.form in ("linear", "conv"):
                self._forwards.append((owner, owner.__dict__.get("forward")))
                owner.forward = self._make_forward(route, owner)
            else:
                self._hooks.append(owner.register_forward_hook(self._make_hook(route)))
        if self.head_name is not None:
            parent, _, attr = self.head_name.rpartition(".")
            holder = self.model.get_submodule(parent)
            self._own_head = getattr(holder, attr)
            setattr(holder, attr, _RoutedHead(self))

    def remove(self) -> nn.Module:
        """Unhook the model and give it back its own head; returns the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for owner, own in reversed(self._forwards):
            del owner.forward
            if own is not None:
                owner.forward = own
        self._forwards.clear()
        if self.head_name is not None and hasattr(self, "_own_head"):
            parent, _, attr = self.head_name.rpartition(".")
            setattr(self.model.get_submodule(parent), attr, self._own_head)
            del self._own_head
        return self.model

    def __enter__(self) -> TaskRouter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- running ------------------------------------------------------------------------------

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        with self.routing(self.checked(task, x)):
            return self.model(x)

    @contextmanager
    def routing(self, task: Tensor) -> Iterator[None]:
        """Rows of the next forward passes go to `task` (already checked: see `checked`)."""
        self._task = task
        try:
            yield
        finally:
            self._task = None

    def checked(self, task: Tensor, x: Tensor) -> Tensor:
        """`task` as indices the tables can gather, refused when out of range or of another length than x's batch."""
        if not torch.compiler.is_exporting():
            self._check_eagerly(task, x.shape[0])
        k = self.num_tasks
        # reason: in a graph, Concat refuses a task length other than the batch (a broadcast would not)
        task = torch.cat([task.reshape(-1, 1), x.new_zeros((x.shape[0], 1), dtype=torch.long)], dim=1)[:, 0]
        task = torch.where(task < 0, task - k, task)  # ONNX's Gather wraps -1 to K-1: move negatives below -K, out of its range
        return torch.index_select(self.task_ids, 0, task)  # refuses anything outside 0..K-1

    def _check_eagerly(self, task: Tensor, batch: int) -> None:
        if not isinstance(task, Tensor) or task.dtype != torch.long or task.dim() != 1:
            raise RoutingError(f"task must be a 1-D int64 tensor of task indices, got {getattr(task, 'dtype', type(task).__name__)} "
                               f"of shape {tuple(getattr(task, 'shape', ()))}")
        if task.shape[0] != batch:
            raise RoutingError(f"task has {task.shape[0]} indices for a batch of {batch}: one task per sample")
        bad = task[(task < 0) | (task >= self.num_tasks)]
        if bad.numel():
            raise RoutingError(f"task index {int(bad[0])} is out of range: this model serves {self.num_tasks} tasks, 0..{self.num_tasks - 1}")

    def _rows(self, where: str, rows: int) -> Tensor:
        """The task of each sample, checking that a site's `rows` are whole samples (batch-major)."""
        task = self._task
        if task is None:
            raise RoutingError(f"{where} ran without a task: call the TaskRouter, or the model inside rlrr.per_sample")
        if not torch.compiler.is_exporting() and rows % task.shape[0]:
            raise RoutingError(f"{where} sees a batch of {rows} rows for {task.shape[0]} samples: per-sample routing needs every "
                               "layer's batch to be the samples, or a whole multiple of them, batch-major (as Swin's windows)")
        return task

    def _make_forward(self, route: _Route, module: nn.Module):
        """The per-row forward of an RLRR linear or conv site, which replaces the module's own (W is read once)."""
        table, site, scaling = self.tables[route.index], route.site, self.config.weight_scaling

        def linear(x: Tensor) -> Tensor:
            task = self._rows(site.name, x.shape[0])
            n = task.shape[0]
            y = linear_rows(x.reshape(n, -1, x.shape[-1]), module.weight, module.bias, table.rows("s_left", task),
                            table.rows("s_right", task), table.rows("shift", task), scaling)
            return y.reshape(*x.shape[:-1], y.shape[-1])

        def conv(x: Tensor) -> Tensor:
            task = self._rows(site.name, x.shape[0])
            task = task[:, None].expand(task.shape[0], x.shape[0] // task.shape[0]).reshape(-1)
            padding = (0, 0) if module.padding == "valid" else module.padding
            return conv2d_rows(x, module.weight, module.bias, table.rows("s_left", task), table.rows("s_right", task),
                               table.rows("shift", task), scaling, module.stride, padding, module.dilation)

        return linear if route.form == "linear" else conv

    def _make_hook(self, route: _Route):
        """The forward hook of a scale-and-shift site (norm, SSF): s ⊙ y + t on the module's own output."""
        table, site, form = self.tables[route.index], route.site, route.form

        def scale(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            task = self._rows(site.name, out.shape[0])
            n = task.shape[0]
            s, t = table.rows("scale", task), table.rows("shift", task)
            if form == "scale last":
                y = out.reshape(n, -1, math.prod(s.shape[1:]))
                view = (n, 1, -1)
            else:
                if not torch.compiler.is_exporting() and out.shape[1] != s.shape[1]:
                    raise RoutingError(f"{site.name}: output {tuple(out.shape)} has no channel axis 1 of size {s.shape[1]}")
                y = out.reshape(n, -1, out.shape[1], math.prod(out.shape[2:]))
                view = (n, 1, -1, 1)
            s = s.reshape(view)
            t = None if t is None else t.reshape(view)
            return scale_shift_rows(y, s, t).reshape(out.shape)

        return scale

    def head_rows(self, x: Tensor) -> Tensor:
        """Each row through its task's head: (R, ..., features) -> (R, ..., max classes), -inf past its own."""
        task = self._rows(self.head_name, x.shape[0])
        n, width = task.shape[0], max(self.classes)
        column = torch.arange(width, device=task.device)
        rows = torch.index_select(self.head_offset, 0, task)[:, None] + column  # (N, width): the task's rows, then its neighbours'
        rows = rows.clamp(max=self.head_weight.shape[0] - 1)
        w = self.head_weight[rows]  # (N, width, features)
        y = torch.matmul(x.reshape(n, -1, x.shape[-1]), w.transpose(1, 2)) + self.head_bias[rows][:, None, :]
        own = column < torch.index_select(self.head_classes, 0, task)[:, None]  # (N, width)
        y = torch.where(own[:, None, :], y, torch.full_like(y, PAD))
        return y.reshape(*x.shape[:-1], width)


@contextmanager
def per_sample(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row n of a batch runs through the named adapter `names[n]` (None: the base model).

        with rlrr.per_sample(model, ["cars", "pets", None]) as m:
            y = m(x)      # x has 3 rows; y is padded with -inf past each task's classes

    Each named adapter brings its trained head, if it has one; None rows, and adapters without
    one, use the model's own head (its tensors as they are when the block starts). The live
    adapter is disabled inside the block and made live again after it. For inference: the
    stacked tensors are copies, so nothing inside trains.
    """
    names = list(names)
    if not names:
        raise ConfigError("per_sample needs one adapter name (or None) per batch row, got none")
    order = list(dict.fromkeys(names))
    tasks = [None if n is None else get_adapter(model, n) for n in order]
    active = active_adapters(model)
    disable_adapters(model)
    try:
        router = TaskRouter(model, tasks, sources=[f"adapter {n!r}" for n in order])
    except Exception:
        if active:
            set_active(model, active)
        raise
    device = router.task_ids.device
    task = torch.tensor([order.index(n) for n in names], dtype=torch.long, device=device)

    def check_batch(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.shape[0] != task.shape[0]:
            raise RoutingError(f"per_sample was given {task.shape[0]} names, the model a batch of {x.shape[0]}: one name per row")

    entry = model.register_forward_pre_hook(check_batch)
    try:
        with router.routing(task):
            yield model
    finally:
        entry.remove()
        router.remove()
        if active:
            set_active(model, active)
