"""Sharding is data: the mesh, one rules table from logical axis names to mesh axes, and the shardings that
follow from it for parameters, optimizer state and batches.

Parameters carry logical axis names in their ``logical_axes`` metadata (set by the modeling code). Optimizer
moments are created from the parameters with ``tree_map(zeros_like)``, so they are ``nnx.Variable`` s with the
same metadata and get the same shardings; every other leaf (step counters) is replicated.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_narrow.errors import ConfigError

from .config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or None: replicated). One table for every model of the family.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_out": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "position": None,
    "type": None,
    "norm": None,
    "labels": None,
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check the product against the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axis sizes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) > num_devices:
        raise ConfigError(f"mesh: data x fsdp x tensor = {sizes} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with explicit ``Auto`` axis types.

    With every axis size given and fewer than all devices requested, the first devices are used (single
    process only: a multi-process mesh must span every device).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if all(s > 1 for s in shape):
        raise ConfigError(
            f"mesh: data, fsdp and tensor all > 1 ({shape}) is refused: on jax 0.10 XLA's SPMD partitioner "
            "computes wrong gradients for this layout (batch split over two axes with a third axis present; "
            "tests/train/test_sharding.py shows it). Use data x fsdp, fsdp x tensor or data x tensor."
        )
    n = math.prod(shape)
    if n < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(f"mesh: {shape} uses {n} of {len(devices)} devices; a multi-process mesh must use all")
        log.warning("mesh %s uses %d of %d devices", dict(zip(MESH_AXES, shape)), n, len(devices))
        devices = devices[:n]
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(
    logical_axes: tuple[str | None, ...] | None,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: dict[str, Any] | None = None,
    *,
    name: str = "",
) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes. A dimension whose size is not divisible by its
    mesh axes is replicated (logged once per parameter, at INFO)."""
    rules = LOGICAL_RULES if rules is None else rules
    if logical_axes is None:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ConfigError(f"{name}: logical axes {logical_axes} do not match shape {shape}")
    used: set[str] = set()
    out = []
    for axis, dim in zip(logical_axes, shape):
        if axis is not None and axis not in rules:
            raise ConfigError(f"{name}: logical axis {axis!r} has no rule in the sharding rules table")
        target = rules.get(axis) if axis is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if mesh.shape.get(a, 1) > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in names)
        if names and dim % size:
            log.info("%s: dim %d (%s) is not divisible by mesh axes %s = %d; replicated", name, dim, axis, names, size)
            names = ()
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def _variable_sharding(v: Any, mesh: Mesh, rules: dict[str, Any] | None, name: str) -> NamedSharding:
    if isinstance(v, nnx.Variable):
        axes = v.get_metadata().get("logical_axes")
        return NamedSharding(mesh, logical_to_spec(axes, tuple(v.shape), mesh, rules, name=name))
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: dict[str, Any] | None = None) -> Any:
    """NamedShardings for a tree of abstract values: sharded by ``logical_axes`` metadata where a leaf is an
    ``nnx.Variable`` that has it, replicated otherwise. The result mirrors ``abstract_tree`` (Variables kept)."""

    def one(path, v):
        name = jax.tree_util.keystr(path)
        if isinstance(v, nnx.Variable):
            return v.replace(_variable_sharding(v, mesh, rules, name))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Rows split over (data, fsdp); every other dimension replicated."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def host_row_range(sharding: NamedSharding, global_shape: tuple[int, ...], batch_dim: int = 0) -> tuple[int, int]:
    """(start, size) of the contiguous block of ``batch_dim`` rows this process's devices hold.

    Raises:
      ConfigError: the process's rows are not one contiguous block (a mesh layout we do not feed).
    """
    me = jax.process_index()
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map(global_shape).items():
        if device.process_index == me:
            sl = index[batch_dim]
            rows.update(range(*sl.indices(global_shape[batch_dim])))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ConfigError(f"process {me} holds non-contiguous batch rows {sorted(rows)}; reorder the mesh devices")
    return start, stop - start


def describe(tree: Any) -> dict[str, str]:
    """{path: "shape spec"} for logging/tests: the sharding of each array leaf of a concrete tree."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(x, "sharding") and isinstance(x.sharding, NamedSharding):
            out[jax.tree_util.keystr(path)] = f"{tuple(x.shape)} {x.sharding.spec}"
    return out


def is_fully_replicated_everywhere(tree: Any) -> bool:
    """True when no array leaf of ``tree`` is split over any mesh axis."""
    return all(x.sharding.is_fully_replicated for x in jax.tree.leaves(tree) if hasattr(x, "sharding"))


def shard_fraction(x: jax.Array) -> float:
    """Bytes on one device / bytes of the whole array (1.0 when replicated)."""
    shard = x.addressable_shards[0].data
    return float(np.prod(shard.shape)) / float(max(np.prod(x.shape), 1))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree`` carrying ``shardings``: the abstract state an AOT lowering
    and an orbax restore take."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def stacked_shardings(shardings: Any) -> Any:
    """The shardings of a tree stacked on a new leading axis (K vmapped candidates): that axis unsharded, every
    other dimension as in ``shardings`` (a tree of ``NamedSharding`` s, Variables kept)."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)), shardings)


def ensure_batch_mesh(mesh: Mesh | None, **batch_sizes: int) -> Mesh:
    """``mesh`` (default: every device on ``data``), checked: each named batch size (rows, all hosts) is
    divisible by its data x fsdp batch shards.

    Raises:
      ConfigError: naming the batch size and the shard count.
    """
    mesh = make_mesh(MeshConfig()) if mesh is None else mesh
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, size in batch_sizes.items():
        if size % shards:
            raise ConfigError(f"{name} {size} is not divisible by the mesh's data x fsdp = {shards} batch shards")
    return mesh
