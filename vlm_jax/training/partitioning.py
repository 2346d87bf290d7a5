"""Device mesh and shardings: logical axis names on parameters mapped to mesh axes by rules."""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves `parallel.mesh` (one axis may be -1: the remaining devices) to a shape."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'parallel.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'parallel.mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f'parallel.mesh {dict(zip(MESH_AXES, sizes))} does not divide the '
                     f'{num_devices} available devices.')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f'parallel.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} '
                     f'devices but {num_devices} are available; set one axis to -1.')
  return tuple(sizes)


def make_mesh(parallel_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(parallel_cfg.mesh, len(devices))
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules(parallel_cfg) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in parallel_cfg.rules)


def batch_spec(parallel_cfg) -> P:
  """The PartitionSpec of the leading (batch) dimension, from the 'batch' rule."""
  axes = dict(rules(parallel_cfg)).get('batch', ('data', 'fsdp'))
  return P(axes)


def batch_sharding(mesh: Mesh, parallel_cfg) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(parallel_cfg))


def param_shardings(boxed_params, mesh: Mesh, parallel_cfg):
  """NamedShardings for a tree of (abstract) parameters boxed with logical axis names."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules(parallel_cfg))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_sharding,
                        mesh: Mesh):
  """Optimizer-state leaves shaped like parameters share their sharding; others replicate."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, params_sharding,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def check_divisible(abstract_params, shardings, mesh: Mesh) -> None:
  """Raises a readable error if a parameter dimension is not divisible by its mesh axes."""
  flat_p = jax.tree_util.tree_leaves_with_path(abstract_params)
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat_p, flat_s):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        raise ValueError(
            f'Parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be sharded: '
            f'dimension {dim} is not divisible by mesh axes {axes} of size {size}. '
            'Change parallel.mesh or parallel.rules.')
