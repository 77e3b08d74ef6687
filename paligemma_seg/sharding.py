"""The device mesh and every partition rule: the only file that names mesh axes.

Owns: the mesh ('data', 'fsdp'), the rules
mapping the model's logical axis names (`paligemma_seg.model.logical_axes`) to mesh axes, and the
shardings of parameters, optimizer state and batches. Knows nothing about the model or the optimizer
beyond tree shapes.

Rules are (logical name, mesh axes) pairs in priority order, as in flax: the first rule whose
logical name occurs in an array's axes claims its mesh axes, and a mesh axis is used once per array.
For parameters a rule is also skipped when the dimension is not divisible by the mesh axes' size (so
a later dimension may take them); a parameter left fully replicated that way is allowed only if it
is small (< REPLICATE_BELOW_BYTES) and is marked in the table, otherwise a ValueError names it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # The batch is split over every device.
REPLICATE_BELOW_BYTES = 1 << 20  # Indivisible parameters smaller than this are replicated (logged).

Rules = tuple[tuple[str, Any], ...]
_ACTIVATIONS: Rules = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("cache_length", None),
)
RULES: dict[str, Rules] = {
    # Fully-sharded data parallel: every large parameter (and its optimizer state) is split over
    # 'fsdp' along one model dimension; XLA all-gathers it for use and reduce-scatters its gradient.
    "fsdp": (
        *_ACTIVATIONS,
        ("embed", "fsdp"),
        ("mlp", "fsdp"),
        ("vocab", "fsdp"),
        ("heads", "fsdp"),
        ("kv_heads", "fsdp"),
        ("head_dim", "fsdp"),
        ("layers", None),
    ),
    # Pure data parallelism: parameters replicated on every device, only the batch is split.
    "replicated": _ACTIVATIONS,
}


def make_mesh(data: int = 1, fsdp: int = -1, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh ('data', 'fsdp') over all devices; `fsdp=-1` takes every device `data` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if fsdp == -1:
        if data < 1 or count % data:
            raise ValueError(
                f"mesh.data={data} must divide the {count} devices; set mesh.data to a divisor "
                f"of {count}."
            )
        fsdp = count // data
    if data * fsdp != count:
        raise ValueError(
            f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} but there are {count} devices; "
            "set mesh.fsdp=-1 to use all remaining devices."
        )
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def get_rules(strategy: str) -> Rules:
    """The rule table of `mesh.strategy`."""
    if strategy not in RULES:
        raise ValueError(f"mesh.strategy={strategy!r}; use one of {sorted(RULES)}.")
    return RULES[strategy]


def _axis_size(mesh: Mesh, axes: Any) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[name] for name in names)


def _used(axes: Any) -> set[str]:
    if axes is None:
        return set()
    return {axes} if isinstance(axes, str) else set(axes)


def spec_for(
    name: str,
    shape: Sequence[int],
    dtype: Any,
    logical: Sequence[str | None],
    mesh: Mesh,
    rules: Rules,
) -> tuple[PartitionSpec, str]:
    """PartitionSpec of one parameter and a note for the table ('' or why it is replicated)."""
    if len(logical) != len(shape):
        raise ValueError(
            f"{name}: {len(logical)} logical axes {tuple(logical)} for shape {tuple(shape)}."
        )
    assigned: list[Any] = [None] * len(shape)
    used: set[str] = set()
    skipped: list[str] = []
    for rule_name, mesh_axes in rules:
        if rule_name not in logical or mesh_axes is None:
            continue
        pos = list(logical).index(rule_name)
        size = _axis_size(mesh, mesh_axes)
        if assigned[pos] is not None or used & _used(mesh_axes) or size == 1:
            continue
        if shape[pos] % size:
            skipped.append(f"{rule_name}={shape[pos]} % {mesh_axes}={size}")
            continue
        assigned[pos] = mesh_axes
        used |= _used(mesh_axes)
    note = ""
    if skipped and not used:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes >= REPLICATE_BELOW_BYTES:
            raise ValueError(
                f"parameter {name} {tuple(shape)} ({nbytes / 2**20:.1f} MiB) cannot be split: "
                f"{'; '.join(skipped)} != 0. Pick mesh.fsdp dividing its dimensions, or "
                "mesh.strategy='replicated'."
            )
        note = f"replicated (small; {'; '.join(skipped)})"
    return PartitionSpec(*assigned), note


def param_specs(
    abstract_params: Any, logical_axes: Any, mesh: Mesh, rules: Rules
) -> tuple[Any, list[tuple[str, tuple[int, ...], str, str]]]:
    """(tree of PartitionSpec, table rows (path, shape, spec, note)) for a parameter tree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    logical_leaves = treedef.flatten_up_to(logical_axes)
    specs, rows = [], []
    for (path, leaf), logical in zip(leaves, logical_leaves, strict=True):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        spec, note = spec_for(name, leaf.shape, leaf.dtype, logical, mesh, rules)
        specs.append(spec)
        rows.append((name, tuple(leaf.shape), str(spec), note))
    return jax.tree_util.tree_unflatten(treedef, specs), rows


def format_table(rows: Sequence[tuple[str, tuple[int, ...], str, str]]) -> str:
    """Parameter path -> shape -> PartitionSpec (+ note), one line each."""
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join(
        f"{p:<{width}}  {str(s):<22} {spec} {note}".rstrip() for p, s, spec, note in rows
    )


def _state_leaf_spec(state_leaf: Any, spec: PartitionSpec, param: Any) -> PartitionSpec:
    """Spec of an optimizer-state leaf mirroring `param` (factored moments drop a dimension)."""
    if not hasattr(state_leaf, "shape"):
        return PartitionSpec()
    full = tuple(spec) + (None,) * (len(param.shape) - len(tuple(spec)))
    if tuple(state_leaf.shape) == tuple(param.shape):
        return PartitionSpec(*full)
    for drop in range(len(param.shape)):  # Adafactor's row/column statistics.
        kept = param.shape[:drop] + param.shape[drop + 1 :]
        if tuple(state_leaf.shape) == tuple(kept):
            return PartitionSpec(*(full[:drop] + full[drop + 1 :]))
    return PartitionSpec()


def opt_state_specs(
    tx: optax.GradientTransformation, abstract_opt_state: Any, specs: Any, abstract_params: Any
) -> Any:
    """Optimizer-state specs: parameter-shaped leaves follow their parameter, the rest replicate."""
    return optax.tree_map_params(
        tx,
        _state_leaf_spec,
        abstract_opt_state,
        specs,
        abstract_params,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def to_shardings(mesh: Mesh, specs: Any) -> Any:
    """Tree of PartitionSpec -> tree of NamedSharding on `mesh`."""
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of scalars and small metadata: a copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every batch array: leading (batch) dimension split over all devices."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def local_batch_rows(mesh: Mesh, global_batch: int) -> slice:
    """Rows of the global batch that this process's devices hold (one contiguous block)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = [idx[0].start or 0 for idx in indices.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in indices.values()]
    start, stop = min(starts), max(stops)
    blocks = sorted(set(zip(starts, stops, strict=True)))
    if stop - start != sum(b - a for a, b in blocks):
        raise RuntimeError(f"this process's batch rows are not contiguous: {blocks}")
    return slice(start, stop)


def check_batch(mesh: Mesh, batch_size: int, grad_accum: int) -> None:
    """Each micro-batch must split evenly over the devices."""
    devices = mesh.devices.size
    if batch_size % grad_accum or (batch_size // grad_accum) % devices:
        raise ValueError(
            f"batch_size={batch_size} / optim.grad_accum={grad_accum} must be a multiple of the "
            f"{devices} devices; set batch_size to a multiple of {grad_accum * devices}."
        )


def log_table(rows: Sequence[tuple[str, tuple[int, ...], str, str]], mesh: Mesh) -> None:
    """Logs the parameter sharding table once, on process 0."""
    if jax.process_index() == 0:
        logging.info("Mesh %s; parameter shardings:\n%s", dict(mesh.shape), format_table(rows))
