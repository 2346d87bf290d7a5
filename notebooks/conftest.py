"""pytest runs these notebooks with nbmake (`--nbmake` in setup.cfg), each in a fresh
`python3` kernel that inherits this process's environment, which is adjusted while a
notebook runs:

- tests/conftest.py sets XLA_FLAGS to fake 8 CPU devices for the unit tests; a notebook runs
  as a reader's would, on the real devices (8 fake devices share the same cores and make
  training about 2x slower), so that flag is removed;
- the kernels share a JAX persistent compilation cache (a temporary directory, unless
  JAX_COMPILATION_CACHE_DIR is set): notebooks that train the same config compile its steps
  once (the search notebook's CLIP is the quickstart's; measured 65 -> 30 s).
"""
import os
import re
import shutil
import tempfile

import pytest

_DEVICE_COUNT = re.compile(r'\s*--xla_force_host_platform_device_count=\S+')
_CACHE_VAR = 'JAX_COMPILATION_CACHE_DIR'
_cache_dir = None  # the temporary cache this session created, if any


def _notebook_env() -> dict[str, str]:
  global _cache_dir
  env = {}
  if 'XLA_FLAGS' in os.environ:
    env['XLA_FLAGS'] = _DEVICE_COUNT.sub('', os.environ['XLA_FLAGS']).strip()
  if _CACHE_VAR not in os.environ:
    _cache_dir = _cache_dir or tempfile.mkdtemp(prefix='vlm_jax_notebooks_jax_cache_')
    env[_CACHE_VAR] = _cache_dir
  return env


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
  del item
  env = _notebook_env()
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        del os.environ[key]
      else:
        os.environ[key] = value


def pytest_unconfigure(config):
  del config
  if _cache_dir:
    shutil.rmtree(_cache_dir, ignore_errors=True)
