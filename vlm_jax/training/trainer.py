"""The training loop: build everything from the config, resume, train, checkpoint, evaluate."""
import json
import logging
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import config_utils
from vlm_jax import models
from vlm_jax.data import datasets
from vlm_jax.data import pipeline
from vlm_jax.eval import runner
from vlm_jax.training import checkpointing
from vlm_jax.training import objectives
from vlm_jax.training import optimizer as optimizer_lib
from vlm_jax.training import partitioning
from vlm_jax.training import writers
from vlm_jax.training.state import TrainState


def check_workdir(workdir: str) -> None:
  """Creates `workdir`, or says clearly why it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(f'Cannot create workdir {workdir!r}: {e.strerror}. Choose another --workdir.') from None
  if not os.access(workdir, os.W_OK):
    raise OSError(f'Workdir {workdir!r} is not writable. Choose another --workdir.')


def resolve_config(config: ml_collections.ConfigDict, tokenizer) -> None:
  """Fills values that depend on the data (the vocabulary size)."""
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
  """Model, optimizer, mesh and sharded state built from a resolved config."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    self.config = config
    self.mesh = mesh or partitioning.make_mesh(config.parallel)
    self.rules = partitioning.rules(config.parallel)
    self.model = models.build_model(config.model, text_max_len=config.data.max_text_len)
    self.tx, self.schedule = optimizer_lib.make_optimizer(config.optim, config.train.num_steps)
    self.loss_fn = objectives.make_loss_fn(self.model, config)
    self.batch_sharding = partitioning.batch_sharding(self.mesh, config.parallel)
    self.replicated = NamedSharding(self.mesh, P())

    batch = dummy_batch(config)

    def init_boxed(rng):
      return self.model.init({'params': rng}, batch['image'], batch['text_ids'],
                             batch['text_mask'])['params']

    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    params_sharding = partitioning.param_shardings(boxed, self.mesh, config.parallel)
    abstract_params = nn.unbox(boxed)
    partitioning.check_divisible(abstract_params, params_sharding, self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    opt_sharding = partitioning.opt_state_shardings(self.tx, abstract_opt, params_sharding,
                                                    self.mesh)
    self.state_sharding = TrainState(step=self.replicated, params=params_sharding,
                                     opt_state=opt_sharding)
    self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))

    def init_state(rng):
      params = nn.unbox(init_boxed(rng))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params))

    self._init_state = jax.jit(init_state, out_shardings=self.state_sharding)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(init_state, jax.random.key(0)), self.state_sharding)
    self.train_step = jax.jit(
        self._train_step,
        in_shardings=(self.state_sharding, self.batch_sharding, self.replicated),
        out_shardings=(self.state_sharding, self.replicated),
        donate_argnums=(0,))

  def init_state(self, rng: jax.Array) -> TrainState:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._init_state(rng)

  def _train_step(self, state: TrainState, batch: dict, rng: jax.Array
                  ) -> tuple[TrainState, dict]:
    """One update. `batch` holds the global batch, sharded over the batch mesh axes."""
    rng = jax.random.fold_in(rng, state.step)
    with nn.logical_axis_rules(self.rules):
      (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
          state.params, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    metrics = {'loss': loss, **aux,
               'grad_norm': jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
               'learning_rate': self.schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def step(self, state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    with jax.set_mesh(self.mesh):
      return self.train_step(state, batch, rng)

  def device_batch(self, host_batch: dict) -> dict:
    """Places this process's part of the global batch onto the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in host_batch.items()}


def _log_setup(config, setup: Setup, start_step: int) -> None:
  logging.info('JAX %s, backend %s, %d process(es), %d device(s): %s', jax.__version__,
               jax.default_backend(), jax.process_count(), jax.device_count(),
               ', '.join(sorted({d.device_kind for d in jax.devices()})))
  logging.info('Mesh %s', dict(setup.mesh.shape))
  logging.info('Model %s: %s parameters', config.model.name, f'{setup.num_params:,}')
  logging.info('Training %d steps at global batch %d, starting from step %d',
               config.train.num_steps, config.train.batch_size, start_step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> tuple[TrainState, dict]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), evaluates; returns the
  final state and evaluation metrics (as in `results.json`; empty if the run stopped early)."""
  primary = jax.process_index() == 0
  check_workdir(workdir)
  info = datasets.ensure_built(config.data)
  tokenizer = datasets.load_tokenizer(config.data)
  resolve_config(config, tokenizer)

  setup = Setup(config)
  checkpointer = checkpointing.Checkpointer(workdir, config)
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_utils.to_json(config))

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  data_iter = pipeline.make_train_iterator(
      config.data, tokenizer, config.train.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())

  latest = checkpointer.latest_step()
  if latest is not None:
    state, data_state = checkpointer.restore(latest, setup.abstract_state)
    if data_state.get('iterator') is not None:
      data_iter.set_state(data_state['iterator'])
    logging.info('Resuming from checkpoint at step %d in %s', latest, checkpointer.directory)
  else:
    state = setup.init_state(init_rng)
  start_step = int(jax.device_get(state.step))
  _log_setup(config, setup, start_step)
  logging.info('Data %s/%s: %s', config.data.name, config.data.builder_config,
               {k: v.num_examples for k, v in info.splits.items()})

  writer = writers.MetricWriter(workdir, enabled=primary)
  num_steps = config.train.num_steps
  log_every = max(config.train.log_every_steps, 1)
  max_per_run = config.train.max_steps_per_run
  progress = tqdm.tqdm(total=num_steps, initial=start_step, disable=not primary,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0, desc='train')
  window_start, window_steps = time.perf_counter(), 0
  results: dict[str, Any] = {}
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
      if not np.isfinite(metrics['loss']):
        checkpointer.wait()
        raise FloatingPointError(
            f'Non-finite loss {metrics["loss"]} at step {done}; the last good checkpoint in '
            f'{checkpointer.directory} is kept. Lower optim.learning_rate or set '
            'optim.grad_clip_norm.')
      writer.write(done, {f'train/{k}': v for k, v in metrics.items()})
      progress.set_postfix(loss=f'{metrics["loss"]:.3f}', ex_s=f'{metrics["examples_per_sec"]:.0f}')
      logging.info('step %d/%d loss %.4f lr %.2e, %.1f steps/s, %.0f examples/s', done,
                   num_steps, metrics['loss'], metrics['learning_rate'],
                   metrics['steps_per_sec'], metrics['examples_per_sec'])
      window_start, window_steps = time.perf_counter(), 0
    progress.update(1)
    stop = bool(max_per_run) and done - start_step >= max_per_run and done < num_steps
    if done % config.checkpoint.every_steps == 0 or done == num_steps or stop:
      checkpointer.save(done, state, {'iterator': data_iter.get_state()}, force=True)
    if stop:
      logging.info('Stopping after %d steps of this run (train.max_steps_per_run); the same '
                   'command resumes from step %d.', max_per_run, done)
      break
    every = config.eval.every_steps
    if (every and done % every == 0) or done == num_steps:
      results = runner.evaluate(config, setup.model, state.params, tokenizer)
      writer.write(done, results)
      logging.info('eval at step %d: %s', done, json.dumps(results))
      window_start = time.perf_counter()
  progress.close()
  checkpointer.close()
  final = int(jax.device_get(state.step)) >= num_steps
  if final and not results:
    results = runner.evaluate(config, setup.model, state.params, tokenizer)
  if primary and final:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  writer.close()
  return state, results
