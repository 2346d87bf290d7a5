"""The training loop: build everything from the config, resume, train, checkpoint, evaluate."""
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import config_utils
from vlm_jax import models
from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.eval import runner
from vlm_jax.models import lora
from vlm_jax.training import checkpointing
from vlm_jax.training import cpu_backend
from vlm_jax.training import distributed
from vlm_jax.training import jit_driver
from vlm_jax.training import nonfinite
from vlm_jax.training import optimizer as optimizer_lib
from vlm_jax.training import partitioning
from vlm_jax.training import pmap_driver
from vlm_jax.training import preemption
from vlm_jax.training import pretrained
from vlm_jax.training import writers
from vlm_jax.training.state import TrainState


PARAMS_FILE = 'params.json'  # numbers of parameters: total, trainable, frozen


def check_workdir(workdir: str) -> None:
  """Creates `workdir`, or says clearly why it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(f'Cannot create workdir {workdir!r}: {e.strerror}. Choose another --workdir.') from None
  if not os.access(workdir, os.W_OK):
    raise OSError(f'Workdir {workdir!r} is not writable. Choose another --workdir.')


def resolve_config(config: ml_collections.ConfigDict, tokenizer) -> None:
  """Fills values that depend on the data (the vocabulary size, the [MASK] id)."""
  if config.loss.mlm_mask_id < 0 and tokenizer.mask_id is not None:
    config.loss.mlm_mask_id = tokenizer.mask_id
  for name, word_class in config.loss.mlm_word_classes.items():
    if word_class.probability > 0 and not word_class.token_ids:
      ids, left_out = tokenizer.word_ids(word_class.words)
      word_class.token_ids = tuple(sorted(set(ids)))
      logging.info('MLM word class %r: %d of its %d words are tokens; left out (unknown or '
                   'split): %s', name, len(ids), len(word_class.words), left_out or 'none')
  if config.model.text.vocab_size == 0:
    config.model.text.vocab_size = tokenizer.vocab_size
  elif config.model.text.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model.text.vocab_size={config.model.text.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({tokenizer.vocab_size}); set it to 0 to use the '
                     'tokenizer size.')


def dummy_batch(config: ml_collections.ConfigDict) -> dict:
  size, length = config.data.image_size, config.data.max_text_len
  return {'image': jnp.zeros((1, size, size, 3), jnp.float32),
          'text_ids': jnp.zeros((1, length), jnp.int32),
          'text_mask': jnp.ones((1, length), bool)}


class Setup:
  """Model, optimizer, mesh, sharded state and the train-step driver of `parallel.mode`.

  'jit' (`jit_driver`) runs one global step partitioned over the ('data', 'fsdp', 'tensor')
  mesh, with parameters and optimizer state sharded by `parallel.rules`; 'pmap'
  (`pmap_driver`) runs data parallelism over the mesh's devices with replicated state. In
  both modes the trainer holds the same unreplicated TrainState of global arrays on `mesh`
  (`state_sharding`), so checkpoints, evaluation and resumption do not depend on the mode.
  An unsatisfiable mesh, rule set or batch size is a ValueError here, before compiling.

  Attributes:
    model, tx, schedule: the model, optimizer and learning-rate schedule.
    mesh: the device mesh; rules: flax logical axis rules from `parallel.rules`.
    state_sharding: TrainState of NamedShardings; abstract_state: ShapeDtypeStructs with them.
    loss_fn, batch_sharding, train_step: the driver's (see `JitDriver`, `PmapDriver`).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
    self.config = config
    self.mesh = mesh or partitioning.make_mesh(config.parallel)
    partitioning.check_mode(config.parallel, self.mesh)
    partitioning.check_rules(config.parallel, self.mesh)
    partitioning.check_batch_size(config.train.batch_size, self.mesh, config.parallel)
    self.mode = config.parallel.mode
    self.rules = partitioning.rules(config.parallel)
    self.model = models.build_model(config.model, text_max_len=config.data.max_text_len)
    # LoRA freezes every base parameter outside model.lora.train_also, as optim.frozen does.
    lora_frozen = lora.frozen_patterns(lora.spec_from_config(config.model.lora))
    self.frozen = (*config.optim.frozen, *lora_frozen)
    self.tx, self.schedule = optimizer_lib.make_optimizer(config.optim, config.train.num_steps,
                                                          also_frozen=lora_frozen)
    self.replicated = NamedSharding(self.mesh, P())
    self._init_boxed = functools.partial(_init_boxed_params, self.model, dummy_batch(config))
    self.state_sharding = self._shard_state()
    self._init_state = jax.jit(self._fresh_state, out_shardings=self.state_sharding)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(self._fresh_state, jax.random.key(0)), self.state_sharding)
    self.num_trainable, self.num_params = optimizer_lib.count_params(
        self.abstract_state.params, self.frozen)
    if self.mode == 'pmap':
      self.driver = pmap_driver.PmapDriver(self.model, config, self.tx, self.schedule, self.mesh)
    else:
      self.driver = jit_driver.JitDriver(self.model, config, self.tx, self.schedule, self.mesh,
                                         self.state_sharding)
    self.loss_fn = self.driver.loss_fn
    self.batch_sharding = self.driver.batch_sharding
    self.train_step = self.driver.train_step

  def _shard_state(self) -> TrainState:
    """The TrainState's shardings: by the rules under 'jit', replicated under 'pmap'."""
    boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
    abstract_params = nn.unbox(boxed)
    if self.mode == 'pmap':
      params_sharding = jax.tree.map(lambda _: self.replicated, abstract_params)
    else:
      params_sharding = partitioning.param_shardings(boxed, self.mesh, self.config.parallel)
      partitioning.check_divisible(abstract_params, params_sharding, self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    opt_sharding = partitioning.opt_state_shardings(self.tx, abstract_opt, params_sharding,
                                                    self.mesh)
    return TrainState(step=self.replicated, params=params_sharding, opt_state=opt_sharding,
                      health=jax.tree.map(lambda _: self.replicated, nonfinite.init()))

  def _fresh_state(self, rng: jax.Array) -> TrainState:
    params = nn.unbox(self._init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), health=nonfinite.init())

  def init_state(self, rng: jax.Array) -> TrainState:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._init_state(rng)

  def step(self, state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    """One update; `batch` from `device_batch`, `rng` the run's dropout key."""
    return self.driver.step(state, batch, rng)

  def device_batch(self, host_batch: dict) -> dict:
    """Places this process's part of the global batch onto the devices, as `step` takes it.

    Under `parallel.cpu_tuning` it returns once the copy is done, so that the step runs
    inline on the calling thread (`cpu_backend.wait_for_inputs`)."""
    return cpu_backend.ready(self.driver.device_batch(host_batch))


def _init_boxed_params(model: nn.Module, batch: dict, rng: jax.Array) -> Any:
  """The model's parameters, boxed with their logical axis names."""
  return model.init({'params': rng}, batch['image'], batch['text_ids'],
                    batch['text_mask'])['params']


def _log_setup(config, setup: Setup, start_step: int) -> None:
  logging.info('JAX %s, backend %s, %d process(es), %d device(s): %s', jax.__version__,
               jax.default_backend(), jax.process_count(), jax.device_count(),
               ', '.join(sorted({d.device_kind for d in jax.devices()})))
  logging.info('Mesh %s', dict(setup.mesh.shape))
  logging.info('Model %s: %s parameters, %s trainable (%.2f%%), %s frozen', config.model.name,
               f'{setup.num_params:,}', f'{setup.num_trainable:,}',
               100 * setup.num_trainable / max(setup.num_params, 1),
               f'{setup.num_params - setup.num_trainable:,}')
  logging.info('Training %d steps at global batch %d, starting from step %d',
               config.train.num_steps, config.train.batch_size, start_step)


@dataclasses.dataclass
class _Prepared:
  """What the training loop starts from (see `_prepare`)."""
  setup: Setup
  checkpointer: checkpointing.Checkpointer
  tokenizer: Any
  data_iter: Any
  state: TrainState
  data_state: dict
  dropout_rng: jax.Array


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> tuple[TrainState | None, dict]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), evaluates; returns the
  final state and evaluation metrics (as in `results.json`; empty if the run stopped early;
  (None, {}) after a preemption notice before the first step, which leaves nothing to save).

  SIGTERM (a preemption notice) before the first step stops at once; from the first step on,
  the loop saves a checkpoint after the step it is in and returns (see `preemption`)."""
  with preemption.Watcher() as notice:
    try:
      with notice.interrupting():
        prepared = _prepare(config, workdir)
    except preemption.Preempted as e:
      logging.warning('Preempted (%s) before the first step: nothing to save; the same '
                      'command starts again.', e)
      return None, {}
    return _run(config, workdir, prepared, notice)


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> _Prepared:
  """Builds the data, model and optimizer, writes config.json, restores the latest checkpoint
  (or initialises); nothing here leaves the workdir unusable if interrupted."""
  primary = jax.process_index() == 0
  check_workdir(workdir)
  nonfinite.check_config(config.train)
  pretrained.apply_config(config)  # init.pretrained: the config of what it loads
  info = distributed.primary_first(lambda: datasets.ensure_built(config.data), 'build_data')
  tokenizer = datasets.load_tokenizer(config.data)
  resolve_config(config, tokenizer)

  setup = Setup(config)
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_utils.to_json(config))
    with open(os.path.join(workdir, PARAMS_FILE), 'w') as f:
      json.dump({'total': setup.num_params, 'trainable': setup.num_trainable,
                 'frozen': setup.num_params - setup.num_trainable}, f, indent=2)
  runner.record_prompt_templates(config, workdir)
  checkpointer = checkpointing.Checkpointer(workdir, config, training=True)
  try:
    prepared = _restore_or_init(config, setup, checkpointer, tokenizer)
  except BaseException:
    checkpointer.close(raise_errors=False)
    raise
  _log_setup(config, setup, int(jax.device_get(prepared.state.step)))
  logging.info('Data %s/%s: %s', config.data.name, config.data.builder_config,
               {k: v.num_examples for k, v in info.splits.items()})
  return prepared


def _restore_or_init(config, setup: Setup, checkpointer: checkpointing.Checkpointer,
                     tokenizer) -> _Prepared:
  """The input pipeline and state of the latest checkpoint, or fresh ones."""
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  data_iter = pipeline.make_train_iterator(
      config.data, tokenizer, config.train.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  restored = checkpointer.restore_latest(setup.abstract_state)
  data_state = {}
  if restored is not None:
    latest, state, data_state = restored
    state = state.replace(health=nonfinite.resumed(state.health))
    if data_state.get('iterator') is not None:
      data_iter.set_state(data_state['iterator'])
    logging.info('Resuming from checkpoint at step %d in %s', latest, checkpointer.directory)
  else:
    state = setup.init_state(init_rng)
    if config.init.pretrained:
      state = pretrained.load_into_state(config, state)
      logging.info('Starting from the parameters of %s', config.init.pretrained)
  return _Prepared(setup, checkpointer, tokenizer, data_iter, state, data_state, dropout_rng)


def _run(config: ml_collections.ConfigDict, workdir: str, prepared: _Prepared,
         notice: preemption.Watcher) -> tuple[TrainState, dict]:
  """The training loop from `prepared`, then the final evaluation and results.json."""
  primary = jax.process_index() == 0
  setup, checkpointer, tokenizer = prepared.setup, prepared.checkpointer, prepared.tokenizer
  state = prepared.state
  start_step = int(jax.device_get(state.step))
  # Rows past the checkpoint (written before a crash) are dropped: they will be written again.
  writer = writers.MetricWriter(workdir, enabled=primary, resume_step=start_step)
  try:
    results = {}
    if prepared.data_state.get('eval_pending'):  # preempted before the evaluation of its step
      results = _evaluate(config, setup, state, tokenizer, writer, start_step)
    state, results = _train_steps(config, setup, state, prepared.data_iter,
                                  prepared.dropout_rng, checkpointer, writer, tokenizer,
                                  start_step, results, notice)
  except BaseException:
    checkpointer.close(raise_errors=False)  # finishes a save in flight
    writer.close()
    raise
  checkpointer.close()
  num_steps = config.train.num_steps
  final = int(jax.device_get(state.step)) >= num_steps
  if final and not results:
    results = runner.evaluate(config, setup.model, state.params, tokenizer)
  if primary and final:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  writer.close()
  return state, results


def _evaluate(config, setup: Setup, state: TrainState, tokenizer, writer: writers.MetricWriter,
              step: int) -> dict:
  results = runner.evaluate(config, setup.model, state.params, tokenizer)
  writer.write(step, results)
  logging.info('eval at step %d: %s', step, json.dumps(results))
  return results


def _periodic(step: int, every: int) -> bool:
  """Whether `step` is a multiple of `every` (0 = never: only at the end and when stopping)."""
  return bool(every) and step % every == 0


def _train_steps(config, setup: Setup, state: TrainState, data_iter, dropout_rng: jax.Array,
                 checkpointer: checkpointing.Checkpointer, writer: writers.MetricWriter,
                 tokenizer, start_step: int, results: dict, notice: preemption.Watcher
                 ) -> tuple[TrainState, dict]:
  """Steps `start_step + 1 ... train.num_steps`, logging, evaluating and checkpointing.

  Stops early, after writing a checkpoint, after `train.max_steps_per_run` steps or at a
  preemption notice (SIGTERM). A step's metrics row and evaluation are written before its
  checkpoint, so a resumed run never lacks or repeats a row. Non-finite steps are checked
  (`nonfinite.Monitor`) when logging and before every checkpoint, so that train.nonfinite=
  'stop' never saves a state from after one. Returns the state and the latest evaluation.
  """
  num_steps = config.train.num_steps
  log_every = max(config.train.log_every_steps, 1)
  max_per_run = config.train.max_steps_per_run
  every = config.eval.every_steps
  monitor = nonfinite.Monitor(config.train, checkpointer.directory, state.health)
  progress = tqdm.tqdm(total=num_steps, initial=start_step, disable=not writer.enabled,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0, desc='train')
  window_start, window_steps = time.perf_counter(), 0
  for step in range(start_step, num_steps):
    batch = setup.device_batch(next(data_iter))
    state, metrics = setup.step(state, batch, dropout_rng)
    window_steps += 1
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - window_start
      metrics['examples_per_sec'] = window_steps * config.train.batch_size / elapsed
      metrics['steps_per_sec'] = window_steps / elapsed
      writer.write(done, {f'train/{k}': v for k, v in metrics.items()})
      progress.set_postfix(loss=f'{metrics["loss"]:.3f}',
                           ex_s=f'{metrics["examples_per_sec"]:.0f}')
      logging.info('step %d/%d loss %.4f lr %.2e, %.1f steps/s, %.0f examples/s', done,
                   num_steps, metrics['loss'], metrics['learning_rate'],
                   metrics['steps_per_sec'], metrics['examples_per_sec'])
      monitor.check(state.health, done, checkpointer.latest_step())
      window_start, window_steps = time.perf_counter(), 0
    progress.update(1)
    stop = bool(max_per_run) and done - start_step >= max_per_run and done < num_steps
    preempted = done < num_steps and notice.requested(done)
    eval_due = _periodic(done, every) or done == num_steps
    if eval_due and not preempted:
      results = _evaluate(config, setup, state, tokenizer, writer, done)
      window_start = time.perf_counter()
    save_due = _periodic(done, config.checkpoint.every_steps) or done == num_steps
    if save_due or stop or preempted:
      monitor.check(state.health, done, checkpointer.latest_step())
      checkpointer.save(done, state, {'iterator': data_iter.get_state(),
                                      'eval_pending': eval_due and preempted}, force=True)
    if preempted:
      logging.warning('Preempted (%s) at step %d: saved a checkpoint in %s; the same command '
                      'resumes from step %d.', notice.signal_name, done,
                      checkpointer.directory, done)
      break
    if stop:
      logging.info('Stopping after %d steps of this run (train.max_steps_per_run); the same '
                   'command resumes from step %d.', max_per_run, done)
      break
  progress.close()
  return state, results
