"""Reading Hugging Face `config.json` values with the defaults of their config classes, and
refusing, by name, architecture options that our towers do not have."""
from typing import Any, Mapping

from vlm_jax.convert.rules import ConversionError

# Hugging Face `hidden_act` -> our activation. The tanh approximation has two names there.
ACTIVATIONS = {'gelu': 'gelu', 'quick_gelu': 'quick_gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
               'gelu_new': 'gelu_tanh'}


class UnsupportedOptionError(ConversionError):
  """A Hugging Face config names an architecture option the converter cannot represent."""


class UnsupportedFamilyError(ConversionError):
  """A Hugging Face `model_type` without a converter."""


class HfConfig:
  """A (sub-)config dict: `cfg['key']` falls back to the config class's default.

  transformers writes only values that differ from the defaults, so a key may be absent.
  """

  def __init__(self, values: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str = ''):
    self.values, self.defaults, self.prefix = dict(values), dict(defaults), prefix

  def __getitem__(self, key: str) -> Any:
    if key in self.values and self.values[key] is not None:
      return self.values[key]
    if key not in self.defaults:
      raise ConversionError(f'config.json lacks {self.prefix}{key}.')
    return self.defaults[key]

  def sub(self, key: str, defaults: Mapping[str, Any]) -> 'HfConfig':
    return HfConfig(self.values.get(key) or {}, defaults, f'{self.prefix}{key}.')

  def require(self, key: str, *accepted: Any) -> Any:
    """The value of `key`, or UnsupportedOptionError unless it is one of `accepted`."""
    value = self.values.get(key, self.defaults.get(key))
    if value not in accepted:
      shown = ', '.join(repr(a) for a in accepted)
      raise UnsupportedOptionError(
          f'Unsupported architecture option {self.prefix}{key}={value!r} in config.json '
          f'(supported: {shown}).')
    return value

  def activation(self, key: str = 'hidden_act') -> dict[str, bool]:
    """Our tower flags (quick_gelu, gelu_tanh) for the activation named by `key`."""
    act = ACTIVATIONS[self.require(key, *ACTIVATIONS)]
    return dict(quick_gelu=act == 'quick_gelu', gelu_tanh=act == 'gelu_tanh')


def hidden_act(tower_cfg, tanh_name: str = 'gelu_pytorch_tanh') -> str:
  """Hugging Face `hidden_act` of one of our tower configs."""
  if tower_cfg.gelu_tanh:
    return tanh_name
  return 'quick_gelu' if tower_cfg.quick_gelu else 'gelu'
