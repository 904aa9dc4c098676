"""Meshes, logical-axis rules and shardings: how the train state and the batches are laid out on the devices.

The model names only *logical* axes (models/layers.py lists them); `config.sharding.rules` maps them to the axes
of a mesh of shape `config.mesh` = (data, fsdp, model):

  data   pure data parallelism: the batch is split, parameters are replicated.
  fsdp   the batch is split *and* parameters are sharded along their 'embed' side (ZeRO-3 / FSDP), gathered by
         XLA where a layer needs them.
  model  tensor parallelism: the 'mlp' and 'heads' sides of projections are split.

Parameter shardings come from the abstract state (`jax.eval_shape` of the initialiser, whose leaves carry their
logical names) through the rules, so the state is created directly sharded by `jax.jit(init,
out_shardings=...)` and never exists unsharded on one device. A dimension that a mesh axis does not divide is
left replicated (e.g. a 3-row level-embedding table on a model axis of 2) rather than failing, so one rule set
serves every model size; `describe` says how much of the state ended up sharded.

Multi-host: each process reads its own slice of the data (`[process_index::process_count]`, see
data/pipeline.py) with `batch_size = global_batch // process_count`, and `global_batch` assembles the global
arrays from the process-local batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
# The batch dimension is split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")
# Default logical -> mesh rules (first matching rule wins per array; a mesh axis is used once per array).
DEFAULT_RULES = (
    ("batch", BATCH_AXES),  # first, so activations keep 'fsdp' for their batch and replicate 'embed'
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("conv_out", "model"),
    ("conv_in", None),
    ("vocab", None),  # 30522 BERT rows divide by nothing useful; the tables are small
    ("table", None),
    ("length", None),
    ("height", None),
    ("width", None),
)


def mesh_shape(config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, model) sizes from `config.mesh`; one axis may be -1 ('all remaining devices').

  Raises:
    ValueError: when the sizes do not multiply to `num_devices` (with the numbers).
  """
  sizes = [int(config[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} must hold positive sizes, with at most one -1.")
  known = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                       f"divide the {num_devices} devices available.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                     f"{num_devices} are available; make the product of the axes equal {num_devices} (or set "
                     "one axis to -1).")
  return tuple(sizes)


def make_mesh(config: Mapping[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, model) mesh over `devices` (default: all), with Auto axes (sharding by constraints)."""
  if devices is None:
    devices = jax.devices()
    count = int(config.get("num_devices", 0) or 0)
    if count > len(devices):
      raise ValueError(f"config.mesh.num_devices={count} but only {len(devices)} devices are available.")
    devices = devices[:count] if count else devices
  devices = list(devices)
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def make_rules(rules: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
  """Validates config rules: (logical name, mesh axis | tuple of mesh axes | None) pairs."""
  checked = []
  for logical, mesh_axes in rules:
    axes = mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
    unknown = [axis for axis in axes if axis is not None and axis not in MESH_AXES]
    if unknown:
      raise ValueError(f"config.sharding.rules: ({logical!r}, {mesh_axes!r}) names {unknown}, not mesh axes "
                       f"{MESH_AXES}.")
    if logical == "vocab" and mesh_axes is not None:
      raise ValueError("config.sharding.rules: 'vocab' must map to None (BERT's 30522-row table divides by no "
                       "mesh size worth using, and it is small).")
    checked.append((logical, tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes))
  return tuple(checked)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split (data x fsdp)."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh, process_count: int | None = None, *,
                     name: str = "config.input.batch_size") -> int:
  """Returns the per-process batch; fails (with the numbers) when the batch does not divide evenly. `name` is
  the config field the batch size comes from (for the message)."""
  process_count = jax.process_count() if process_count is None else process_count
  parallel = data_parallel_size(mesh)
  if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
    raise ValueError(f"{name}={global_batch!r} must be a positive int, a multiple of the data-parallel size "
                     f"{parallel}; e.g. {parallel}.")
  if global_batch % parallel:
    raise ValueError(f"{name}={global_batch} must be a multiple of the data-parallel size "
                     f"{parallel} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); e.g. "
                     f"{-(-global_batch // parallel) * parallel}.")
  if global_batch % process_count:
    raise ValueError(f"{name}={global_batch} must be a multiple of the {process_count} "
                     "processes (each reads batch_size // process_count examples).")
  return global_batch // process_count


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
  """`spec` with every mesh axis that does not divide its dimension dropped (that dimension replicates)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    kept = tuple(name for name in names if mesh.shape[name] > 1)
    size = math.prod(mesh.shape[name] for name in kept)
    if not kept or dim % size:
      fitted.append(None)
    else:
      fitted.append(kept if len(kept) > 1 else kept[0])
  return PartitionSpec(*fitted)


def plain(boxed_tree: Any) -> Any:
  """The tree with every logical-axis box replaced by its value (no sharding constraint applied, unlike
  `nn.unbox`, so it also works on abstract values under a mesh)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def state_shardings(abstract_boxed_state: Any, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a state whose parameter leaves are boxed with logical names (`jax.eval_shape(init)`).

  The result is shaped like the *unboxed* state (each box is one leaf); leaves without names replicate.
  """
  specs = nn.get_partition_spec(abstract_boxed_state)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = jax.tree.map(lambda x: x.shape, plain(abstract_boxed_state))
  is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
  return jax.tree.map(lambda spec, shape: NamedSharding(mesh, _fit(spec, shape, mesh)), mesh_specs, shapes,
                      is_leaf=is_spec)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Global device arrays from this process's batch (its `[process_index::process_count]` slice)."""
  sharding = batch_sharding(mesh)
  process_count = jax.process_count()
  return {key: jax.make_array_from_process_local_data(
      sharding, value, (value.shape[0] * process_count, *value.shape[1:]))
          for key, value in local_batch.items()}


def describe(shardings: Any, abstract_state: Any) -> str:
  """One line: how many parameters are sharded, and the largest leaf's layout (to check a mesh does something)."""
  leaves = jax.tree.leaves(jax.tree.map(lambda s, x: (s.spec, x.shape, x.size), shardings, abstract_state,
                                        is_leaf=lambda s: isinstance(s, NamedSharding)),
                           is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3 and isinstance(x[0],
                                                                                                 PartitionSpec))
  total = sum(size for _, _, size in leaves)
  sharded = sum(size for spec, _, size in leaves if any(axis is not None for axis in spec))
  largest = max(leaves, key=lambda leaf: leaf[2])
  return (f"{sharded / max(total, 1):.0%} of {total:,} state values sharded; largest leaf {largest[1]} "
          f"laid out as {largest[0]}")
