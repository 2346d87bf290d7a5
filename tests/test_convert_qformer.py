"""BLIP-2 Q-Former conversion: query outputs match Hugging Face's (with and without an image
mask, and from pixels through the dropped vision tower), exact export / import round trips
through a `Blip2QFormerModel` folder that transformers loads, and errors that name the
problem."""
import json
import os
import shutil

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import hf_reference as ref  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import convert, defaults, models  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.convert import blip2_qformer, hf, hf_io  # pylint: disable=g-import-not-at-top,wrong-import-position

TOL = 1e-5
B, N, DI = 2, 7, 24  # batch, image tokens, their width (the tiny vision tower's)
MASK = np.array([[1] * N, [1, 1, 1, 0, 0, 0, 0]], bool)


@pytest.fixture(scope='module')
def full(tmp_path_factory):
  """(folder, model) of a tiny `Blip2Model` (vision tower, Q-Former, OPT)."""
  folder = str(tmp_path_factory.mktemp('blip2'))
  return folder, ref.blip2(folder)


def _image_tokens(seed=0):
  return np.random.RandomState(seed).randn(B, N, DI).astype(np.float32)


def _theirs(qformer, query_tokens, tokens, mask=None):
  """HF query outputs [B, Q, D] (numpy) for image tokens [B, N, Di]."""
  kwargs = {} if mask is None else {'encoder_attention_mask': torch.from_numpy(
      mask.astype(np.int64))}
  with torch.no_grad():
    out = qformer(query_embeds=query_tokens.expand(len(tokens), -1, -1),
                  encoder_hidden_states=torch.from_numpy(tokens), **kwargs)
  return out.last_hidden_state.numpy()


def _max_diff(ours, theirs) -> float:
  return float(np.abs(np.asarray(ours, np.float64) - theirs).max())


def test_query_outputs_match_blip2(full):
  folder, model_pt = full
  model, params, tokenizer = convert.load_hf(folder)
  assert tokenizer is None
  tokens = _image_tokens()
  diffs = {}
  for name, mask in (('no mask', None), ('mask', MASK)):
    args = (tokens,) if mask is None else (tokens, mask)
    ours = model.apply({'params': params}, *args)
    assert ours.shape == (B, 5, 32)
    diffs[name] = _max_diff(ours, _theirs(model_pt.qformer, model_pt.query_tokens, tokens,
                                          mask))
  # The mask matters: the masked tokens change HF's outputs and ours alike.
  unmasked = model.apply({'params': params}, tokens)
  assert np.abs(np.asarray(unmasked) - model.apply({'params': params}, tokens, MASK)).max() > 1e-3
  # From pixels: our input is the vision tower's last_hidden_state (get_qformer_features).
  pixels = ref.nchw(ref.images(B, 32))
  with torch.no_grad():
    image_embeds = model_pt.vision_model(pixel_values=pixels).last_hidden_state
    expected = model_pt.get_qformer_features(pixel_values=pixels).numpy()  # last_hidden_state
  ours = model.apply({'params': params}, image_embeds.numpy(), method=model.encode_queries)
  diffs['pixels'] = _max_diff(ours, expected)
  print(f'blip-2 Q-Former max abs diff: {diffs}')
  assert max(diffs.values()) < TOL, diffs


def test_export_round_trip_is_exact_and_loads_in_transformers(full, tmp_path):
  folder, model_pt = full
  config, params, _ = hf.import_hf(folder)
  out = str(tmp_path / 'exported')
  assert hf.export_hf(config, params, None, out) == 'blip_2_qformer'
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors',
                                     'query_tokens.safetensors']
  original, exported = hf_io.read_weights(folder), hf_io.read_weights(out)
  assert set(exported) == {n[len('qformer.'):] for n in original if n.startswith('qformer.')}
  for name, value in exported.items():
    np.testing.assert_array_equal(value, original['qformer.' + name], err_msg=name)
  queries = hf_io.read_safetensors(os.path.join(out, 'query_tokens.safetensors'))
  np.testing.assert_array_equal(queries['query_tokens'], original['query_tokens'])
  # Import the export, and export that again: the same parameters, the same files.
  config2, params2, _ = hf.import_hf(out)
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  again = str(tmp_path / 'again')
  hf.export_hf(config2, params2, None, again)
  for name in ('model.safetensors', 'query_tokens.safetensors'):
    first = hf_io.read_safetensors(os.path.join(out, name))
    second = hf_io.read_safetensors(os.path.join(again, name))
    assert set(first) == set(second)
    for key, value in first.items():
      np.testing.assert_array_equal(second[key], value, err_msg=key)
  # transformers loads it: every weight, nothing left over, the same outputs.
  reloaded, info = transformers.Blip2QFormerModel.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  expected = model_pt.qformer.state_dict()
  assert set(reloaded.state_dict()) == set(expected)
  for name, value in reloaded.state_dict().items():
    assert torch.equal(value, expected[name]), name
  query_tokens = torch.from_numpy(np.array(queries['query_tokens']))
  tokens = _image_tokens(1)
  model = hf.build(config2)
  ours = model.apply({'params': params2}, tokens, MASK)
  assert _max_diff(ours, _theirs(reloaded.eval(), query_tokens, tokens, MASK)) < TOL


def test_workdir_round_trip_through_the_cli(full, tmp_path):
  from vlm_jax.convert import __main__ as cli_main  # pylint: disable=g-import-not-at-top
  folder, _ = full
  work, back = str(tmp_path / 'work'), str(tmp_path / 'back')
  assert ': qformer, ' in cli_main.import_folder(folder, work)
  assert 'Blip2QFormerModel' in cli_main.export_workdir(work, back)
  original, exported = hf_io.read_weights(folder), hf_io.read_weights(back)
  assert all(np.array_equal(v, original['qformer.' + k]) for k, v in exported.items())


def test_model_from_a_config_exports(tmp_path):
  """A Q-Former configured here (width from the text tower, dropout) exports and comes back."""
  config = defaults.base_config()
  config.model.name = 'qformer'
  config.model.text.width, config.model.image.width = 16, 12
  config.model.fusion.update(name='qformer', width=0, depth=2, num_heads=2, mlp_dim=24,
                             every=1, num_queries=3, dropout=0.1, ln_eps=1e-6)
  model = models.build_model(config.model, text_max_len=8)
  params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 4, 12), np.float32)))['params']
  params = jax.tree.map(lambda x: x + 0.1 * np.random.RandomState(0).randn(*x.shape), params)
  hf.export_hf(config, params, None, str(tmp_path))
  loaded, info = transformers.Blip2QFormerModel.from_pretrained(str(tmp_path),
                                                                output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  assert loaded.config.hidden_size == 16 and loaded.config.cross_attention_frequency == 1
  _, params2, _ = hf.import_hf(str(tmp_path))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float32(b)), params2, params)


def test_text_input_checkpoint_drops_the_text_towers(tmp_path, caplog):
  """Blip2ForImageTextRetrieval: text embeddings, heads and the Q-Former's text feed-forward
  are dropped (and named in the log); the query outputs still match."""
  model_pt = ref.blip2(str(tmp_path), 'Blip2ForImageTextRetrieval', text_input=True)
  with caplog.at_level('WARNING'):
    model, params, _ = convert.load_hf(str(tmp_path))
  assert 'Dropping' in caplog.text and 'embeddings.' in caplog.text
  assert 'mlp_text' not in params['qformer']['layer_0']
  tokens = _image_tokens(2)
  ours = model.apply({'params': params}, tokens, MASK)
  assert _max_diff(ours, _theirs(model_pt.qformer, model_pt.query_tokens, tokens, MASK)) < TOL


def test_bare_qformer_folder_needs_its_query_tokens(full, tmp_path):
  """A Blip2QFormerModel saved by transformers holds no query tokens: refused, naming the file
  to add; with it, the folder converts (Q from the file's shape)."""
  _, model_pt = full
  folder = str(tmp_path / 'bare')
  model_pt.qformer.save_pretrained(folder)
  with pytest.raises(convert.ConversionError, match='query_tokens.safetensors'):
    convert.load_hf(folder)
  hf_io.write_weights(folder, {'query_tokens': model_pt.query_tokens.detach().numpy()},
                      blip2_qformer.QUERY_FILE)
  model, params, _ = convert.load_hf(folder)
  tokens = _image_tokens(3)
  ours = model.apply({'params': params}, tokens)
  assert _max_diff(ours, _theirs(model_pt.qformer, model_pt.query_tokens, tokens)) < TOL


def _edit_config(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, 'config.json')
  with open(path) as f:
    config = json.load(f)
  edit(config)
  with open(path, 'w') as f:
    json.dump(config, f)
  return str(dst)


def test_unsupported_activation_is_named(full, tmp_path):
  folder = _edit_config(full[0], tmp_path / 'relu',
                        lambda c: c['qformer_config'].update(hidden_act='relu'))
  with pytest.raises(convert.UnsupportedOptionError, match=r"qformer_config\.hidden_act='relu'"):
    convert.load_hf(folder)
  config, params, _ = hf.import_hf(full[0])
  with pytest.raises(convert.ConversionError, match="exports as blip_2_qformer, not 'blip-2'"):
    hf.export_hf(config, params, None, str(tmp_path / 'out'), 'blip-2')
