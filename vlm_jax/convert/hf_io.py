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
  """The JSON object of `path`; a ValueError naming the file if it is not valid JSON."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e.msg} at line {e.lineno}, column '
                       f'{e.colno}).') from None


def write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def _safetensors_header(path: str) -> tuple[dict, int, int]:
  """(header, offset of the data, size of the data) of a .safetensors file; a ValueError naming the file
  for anything that is not a complete one (truncated, another format)."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    header_len = struct.unpack('<Q', head)[0] if len(head) == 8 else -1
    if not 0 < header_len <= size - 8:
      raise ValueError(f'{path} is not a safetensors file (its {size} bytes do not start with '
                       'a header length that fits); re-save it with save_pretrained.')
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
      header = None
  if not isinstance(header, dict):
    raise ValueError(f'{path} is not a safetensors file (its header is not a JSON object).')
  return header, 8 + header_len, size - 8 - header_len


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """name -> array (read-only views of a memory map) of one .safetensors file."""
  header, offset, data_size = _safetensors_header(path)
  data = np.memmap(path, np.uint8, mode='r', offset=offset)
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _DTYPES:
      raise ValueError(f'{path}: tensor {name} has dtype {info["dtype"]}, which is not read.')
    begin, end = info['data_offsets']
    dtype = np.dtype(_DTYPES[info['dtype']])
    if end > data_size or end - begin != dtype.itemsize * int(np.prod(info['shape'])):
      raise ValueError(f'{path} is truncated or damaged: tensor {name} {info["shape"]} needs '
                       f'bytes [{begin}, {end}) of {data_size}; download or save it again.')
    tensors[name] = data[begin:end].view(dtype).reshape(info['shape'])
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
