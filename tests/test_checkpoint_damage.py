"""Checkpoints are demoted only on evidence of damage: the size and CRC32 of each file,
recorded when its save completed, or the fingerprint, or a format error from orbax. A read
that fails for another reason (I/O, permission, memory) stops and moves nothing; readers
(`read_only=True`) fall back without moving anything."""
import errno
import json
import os

import jax
import numpy as np
import pytest

from vlm_jax.training import checkpointing

from test_faults import DAMAGES, _checkpointer, _damage, _save_steps, _state  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _abstract():
  return checkpointing.abstract_like(_state(0))


def _record(tmp_path, step) -> dict:
  with open(tmp_path / 'checkpoints' / str(step) / checkpointing.INTEGRITY_FILE) as f:
    return json.load(f)['files']


@pytest.mark.parametrize('async_save', [True, False])
def test_each_save_records_the_size_and_crc32_of_every_file(tmp_path, async_save):
  checkpointer = _checkpointer(tmp_path, async_save)
  checkpointer.save(1, _state(1), {})
  checkpointer.close()
  files = _record(tmp_path, 1)
  step_dir = tmp_path / 'checkpoints' / '1'
  assert any(name.startswith('state/') for name in files) and 'data/metadata' in files
  for name, (size, crc) in files.items():
    assert os.path.getsize(step_dir / name) == size
    assert checkpointing._crc32(str(step_dir / name)) == crc  # pylint: disable=protected-access


@pytest.mark.parametrize('record', [True, False], ids=['with record', 'old, without record'])
@pytest.mark.parametrize('how', DAMAGES)
def test_damage_is_demoted_with_or_without_the_record(tmp_path, how, record):
  _save_steps(tmp_path)
  if not record:  # a checkpoint written before records existed
    os.remove(tmp_path / 'checkpoints' / '2' / checkpointing.INTEGRITY_FILE)
  _damage(str(tmp_path / 'checkpoints' / '2'), how)
  checkpointer = _checkpointer(tmp_path)
  step, _, _ = checkpointer.restore_latest(_abstract())
  assert step == 1 and checkpointer.all_steps() == [1]
  assert [n.split('.')[0] for n in os.listdir(tmp_path / 'checkpoints.unusable')] == ['2']
  checkpointer.close()


def test_a_changed_byte_outside_the_arrays_is_caught_by_the_record(tmp_path):
  _save_steps(tmp_path)
  path = tmp_path / 'checkpoints' / '2' / 'meta' / 'metadata'
  path.write_text(path.read_text().replace('"', "'", 1))  # same size, other bytes
  checkpointer = _checkpointer(tmp_path)
  assert checkpointer.restore_latest(_abstract())[0] == 1
  assert 'changed after saving (CRC32)' in checkpointer.skipped[0][1]
  checkpointer.close()


def _failing_restore(checkpointer, error: BaseException, step: int = 2):
  """Makes every orbax read of checkpoint `step` raise `error`."""
  restore = checkpointer._manager.restore  # pylint: disable=protected-access

  def failing(at, *args, **kwargs):
    if at == step:
      raise error
    return restore(at, *args, **kwargs)
  checkpointer._manager.restore = failing  # pylint: disable=protected-access


NOT_DAMAGE = {
    'I/O error': OSError(errno.EIO, os.strerror(errno.EIO), 'state/d/0'),
    'permission': PermissionError(errno.EACCES, os.strerror(errno.EACCES), 'state/d/0'),
    'host memory': MemoryError(),
    'tensorstore permission': ValueError('PERMISSION_DENIED: Error reading local file'),
    'tensorstore unavailable': ValueError('UNAVAILABLE: Error reading local file'),
}


@pytest.mark.parametrize('kind', NOT_DAMAGE)
def test_a_failure_that_is_not_damage_stops_and_moves_nothing(tmp_path, kind):
  _save_steps(tmp_path)
  checkpointer = _checkpointer(tmp_path)
  _failing_restore(checkpointer, NOT_DAMAGE[kind])
  with pytest.raises(checkpointing.CheckpointReadError,
                     match=r'Could not read the checkpoint of step 2 in .*checkpoints: '
                           rf'{type(NOT_DAMAGE[kind]).__name__}.*nothing was moved'):
    checkpointer.restore_latest(_abstract())
  assert checkpointer.all_steps() == [1, 2]
  assert not os.path.exists(tmp_path / 'checkpoints.unusable')
  checkpointer.close()


def test_an_io_error_while_checking_the_record_moves_nothing(tmp_path, monkeypatch):
  _save_steps(tmp_path)
  def crc32(path):
    raise OSError(errno.EIO, os.strerror(errno.EIO), path)
  monkeypatch.setattr(checkpointing, '_crc32', crc32)
  checkpointer = _checkpointer(tmp_path)
  with pytest.raises(checkpointing.CheckpointReadError, match='Input/output error'):
    checkpointer.restore_latest(_abstract())
  assert checkpointer.all_steps() == [1, 2]
  checkpointer.close()


def test_a_format_error_reported_by_orbax_is_damage(tmp_path):
  _save_steps(tmp_path)
  checkpointer = _checkpointer(tmp_path)
  _failing_restore(checkpointer, ValueError('DATA_LOSS: Error reading "params.w"'))
  assert checkpointer.restore_latest(_abstract())[0] == 1
  assert checkpointer.all_steps() == [1]
  checkpointer.close()


def test_a_reader_falls_back_and_moves_nothing(tmp_path):
  _save_steps(tmp_path)
  _damage(str(tmp_path / 'checkpoints' / '2'), 'flipped bit')
  checkpointer = _checkpointer(tmp_path)
  step, state, _ = checkpointer.restore_latest(_abstract(), read_only=True)
  assert step == 1 and [s for s, _ in checkpointer.skipped] == [2]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(_state(1)))
  assert checkpointer.all_steps() == [1, 2]
  assert not os.path.exists(tmp_path / 'checkpoints.unusable')
  checkpointer.close()
