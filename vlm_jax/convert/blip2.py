"""Full BLIP-2 checkpoints (Hugging Face model_type 'blip-2': `Blip2Model`,
`Blip2ForConditionalGeneration`, `Blip2ForImageTextRetrieval`, ...) -> our `qformer` model.

Import only: the Q-Former ('qformer.*') and its 'query_tokens' are converted (see
blip2_qformer.py); the vision tower, the language model and the projection heads are dropped
with a log line. Export writes the Q-Former as a 'blip_2_qformer' folder.
"""
import ml_collections

from vlm_jax.convert import blip2_qformer
from vlm_jax.convert import rules as R
from vlm_jax.convert.hf_config import HfConfig

NAME = 'blip-2'
ARCHITECTURE = 'Blip2Model'
IGNORE = blip2_qformer.IGNORE
# Everything but the Q-Former and its queries, and the Q-Former's text feed-forward.
DROPPED = (r'(?!qformer\.|query_tokens$).*',
           *(r'qformer\.' + p for p in blip2_qformer.DROPPED))


def config_from_hf(hf: dict, folder: str, names: set[str]) -> ml_collections.ConfigDict:
  del folder, names
  top = HfConfig(hf, dict(num_query_tokens=32))
  q = top.sub('qformer_config', blip2_qformer.DEFAULTS)
  return blip2_qformer.qformer_config(q, top['num_query_tokens'])


def config_to_hf(config: ml_collections.ConfigDict, tokenizer) -> dict:
  del config, tokenizer
  raise R.ConversionError(f'A {ARCHITECTURE} needs a vision tower and a language model: '
                          f'export the Q-Former as {blip2_qformer.NAME!r}.')


def write_extras(folder: str, config: ml_collections.ConfigDict) -> None:
  del folder, config


def rules(config: ml_collections.ConfigDict) -> list[R.Rule]:
  return blip2_qformer.rules(config, hf_prefix='qformer.')
