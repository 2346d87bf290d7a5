"""What every entry point shares: stray positional arguments are refused with a hint on
quoting; `evaluate` and `generate` read the newest checkpoint that verifies, say which, and
move nothing; `generate` says so when the decoded text is empty."""
import os
import subprocess
import sys

import jax
import pytest

from vlm_jax import config_utils
from vlm_jax.data import datasets
from vlm_jax.training import checkpointing
from vlm_jax.training import trainer

from run_configs import REPO, tiny_config  # pylint: disable=g-bad-import-order
from test_faults import _damage  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
ENV = dict(os.environ, XLA_FLAGS='')
TINY = 'configs/clip_shapes.py:tiny'


def _run(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize('module,args', [
    ('vlm_jax.train', [f'--config={TINY}', '--workdir={tmp}/run', 'stray']),
    ('vlm_jax.evaluate', [f'--config={TINY}', '--workdir={tmp}/run', 'stray']),
    ('vlm_jax.generate', ['--workdir={tmp}/run', '--image=x.png', '--question=how', 'many',
                          'objects']),
    ('vlm_jax.search', ['query', '--db={tmp}/s.db', '--text=a', 'red', 'circle']),
])
def test_stray_positional_arguments_are_refused_with_a_quoting_hint(tmp_path, module, args):
  result = _run(['-m', module, *[a.format(tmp=tmp_path) for a in args]])
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert 'Unexpected argument(s)' in errors[0]
  assert 'quote a value that has spaces, e.g. --question="how many objects"' in errors[0]
  assert not os.listdir(tmp_path)


EMPTY_CAPTION = '''
import sys
from vlm_jax import cli, defaults, generate
from vlm_jax.inference import generation
class Generator:
  def __init__(self, *args, **kwargs): pass
  def captions(self, images): return ['']
generate.read_captioner_config = lambda workdir: defaults.base_config()
generate.restore_captioner = lambda workdir, config: (None, None, None)
generation.Generator = Generator
cli.run(generate.main)
'''


def test_generate_says_when_the_decoded_text_is_empty(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new('RGB', (8, 8)).save(tmp_path / 'x.png')
  result = _run(['-c', EMPTY_CAPTION, f'--workdir={tmp_path}', f'--image={tmp_path}/x.png',
                 '--max_len=8'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout == '\n'
  assert 'notice: the model generated an empty text' in result.stderr


@pytest.fixture(scope='module')
def damaged_run(shapes_small_dir, tmp_path_factory):
  """A workdir (config.json, initial parameters saved as steps 1 and 2), step 2 damaged."""
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config(shapes_small_dir)
  trainer.resolve_config(config, datasets.load_tokenizer(config.data))
  (workdir / 'config.json').write_text(config_utils.to_json(config))
  state = trainer.Setup(config).init_state(jax.random.key(0))
  checkpointer = checkpointing.Checkpointer(str(workdir), config)
  for step in (1, 2):
    checkpointer.save(step, state, {})
  checkpointer.close()
  _damage(str(workdir / 'checkpoints' / '2'), 'flipped bit')
  return workdir


def _assert_nothing_moved(workdir, config):
  checkpointer = checkpointing.Checkpointer(str(workdir), config)
  assert checkpointer.all_steps() == [1, 2]
  checkpointer.close()
  assert not os.path.exists(workdir / checkpointing.UNUSABLE_DIR)


CHOSEN = ('Using the checkpoint of step 1 in {}, the newest that verifies (passed over, and '
          'left in place: step 2: DamagedCheckpointError: the bytes of its file state/')


def test_evaluate_uses_the_newest_checkpoint_that_verifies(damaged_run, shapes_small_dir):
  result = _run(['-m', 'vlm_jax.evaluate', f'--config={TINY}', f'--workdir={damaged_run}',
                 f'--config.data.data_dir={shapes_small_dir}', "--config.eval.splits=('test',)",
                 '--config.eval.max_examples=32', '--config.eval.retrieval=False',
                 '--config.eval.matching=False'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'eval/test/zeroshot_top1' in result.stdout
  assert CHOSEN.format(damaged_run / 'checkpoints') in result.stderr
  _assert_nothing_moved(damaged_run, tiny_config(shapes_small_dir))


RESTORE_CAPTIONER = '''
import logging, sys
logging.getLogger().setLevel(logging.WARNING)  # as vlm_jax.generate
from vlm_jax import generate
from vlm_jax.convert import workdir as workdir_lib
generate.restore_captioner(sys.argv[1], workdir_lib.read_config(sys.argv[1]))
'''


def test_generate_uses_the_newest_checkpoint_that_verifies(damaged_run, shapes_small_dir):
  result = _run(['-c', RESTORE_CAPTIONER, str(damaged_run)])
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.startswith(CHOSEN.format(damaged_run / 'checkpoints'))
  assert len(result.stderr.splitlines()) == 1, result.stderr  # one line, no warnings
  _assert_nothing_moved(damaged_run, tiny_config(shapes_small_dir))
