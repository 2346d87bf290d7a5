"""Mesh construction and its errors."""
import jax
import pytest

from vlm_jax.defaults import base_config
from vlm_jax.training import partitioning


def test_mesh_takes_remaining_devices():
  parallel = base_config().parallel
  assert partitioning.mesh_shape(parallel.mesh, 8) == (8, 1, 1)
  parallel.mesh.update(dict(data=2, fsdp=-1, tensor=2))
  assert partitioning.mesh_shape(parallel.mesh, 8) == (2, 2, 2)
  mesh = partitioning.make_mesh(parallel)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize('mesh,match', [(dict(data=3, fsdp=1, tensor=1), 'does not divide'),
                                        (dict(data=-1, fsdp=-1, tensor=1), 'at most one'),
                                        (dict(data=2, fsdp=2, tensor=1), 'uses 4 devices'),
                                        (dict(data=0, fsdp=1, tensor=1), 'positive')])
def test_unsatisfiable_mesh_is_a_clear_error(mesh, match):
  parallel = base_config().parallel
  parallel.mesh.update(mesh)
  with pytest.raises(ValueError, match=match):
    partitioning.mesh_shape(parallel.mesh, 8)


def test_eight_host_devices_for_tests():
  assert jax.device_count() == 8
