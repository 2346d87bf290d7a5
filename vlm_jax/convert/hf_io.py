"""Files of a Hugging Face checkpoint folder: config.json, safetensors weights (one file or
an index of shards), preprocessor_config.json.

Weights are read with numpy alone (bfloat16 through ml_dtypes, which JAX installs), so that
importing needs neither torch nor transformers; tied tensors are written once, as
`save_pretrained` does.
"""
import json
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

WEIGHTS = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
           'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
           'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """name -> array (read-only views of a memory map) of one .safetensors file."""
  with open(path, 'rb') as f:
    (header_len,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(header_len))
  data = np.memmap(path, np.uint8, mode='r', offset=8 + header_len)
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _DTYPES:
      raise ValueError(f'{path}: tensor {name} has dtype {info["dtype"]}, which is not read.')
    begin, end = info['data_offsets']
    tensors[name] = data[begin:end].view(_DTYPES[info['dtype']]).reshape(info['shape'])
  return tensors


def read_weights(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder (model.safetensors, or its sharded index)."""
  index = os.path.join(folder, WEIGHTS_INDEX)
  if os.path.isfile(index):
    files = sorted(set(read_json(index)['weight_map'].values()))
  elif os.path.isfile(os.path.join(folder, WEIGHTS)):
    files = [WEIGHTS]
  else:
    found = ', '.join(sorted(os.listdir(folder))) or 'nothing'
    raise FileNotFoundError(
        f'No {WEIGHTS} (or {WEIGHTS_INDEX}) in {folder!r} (found: {found}). Only safetensors '
        'weights are read; re-save PyTorch .bin weights with transformers: '
        'model.save_pretrained(dir, safe_serialization=True).')
  tensors = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(folder, name)))
  return tensors


def write_weights(folder: str, tensors: Mapping[str, np.ndarray], name: str = WEIGHTS) -> str:
  """Writes `name` (float32 as given) with the metadata transformers expects."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, name)
  save_file({k: np.array(v, order='C') for k, v in tensors.items()}, path,
            metadata={'format': 'pt'})
  return path


def normalisation(folder: str, default_mean, default_std) -> tuple[tuple, tuple]:
  """(mean, std) of [0, 1] pixels from preprocessor_config.json, else the defaults."""
  path = os.path.join(folder, 'preprocessor_config.json')
  if not os.path.isfile(path):
    return tuple(default_mean), tuple(default_std)
  pre = read_json(path)
  rescale = pre.get('rescale_factor', 1 / 255) if pre.get('do_rescale', True) else 1.0
  if abs(rescale * 255 - 1) > 1e-6:
    raise ValueError(f'{path}: rescale_factor={rescale}; only pixels rescaled to [0, 1] (1/255) '
                     'are supported.')
  if not pre.get('do_normalize', True):
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  mean = pre.get('image_mean', default_mean)
  std = pre.get('image_std', default_std)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def write_preprocessor(folder: str, processor_type: str, image_size: int, mean, std,
                       square: bool) -> None:
  """preprocessor_config.json: resize (to a square, or the shortest edge then a centre crop),
  rescale to [0, 1], normalise by `mean` / `std`."""
  size = ({'height': image_size, 'width': image_size} if square
          else {'shortest_edge': image_size})
  write_json(os.path.join(folder, 'preprocessor_config.json'), {
      'image_processor_type': processor_type, 'do_resize': True, 'size': size,
      'do_center_crop': not square, 'crop_size': {'height': image_size, 'width': image_size},
      'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
      'image_mean': list(mean), 'image_std': list(std), 'resample': 3,
      'do_convert_rgb': True})
