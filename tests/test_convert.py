"""Hugging Face conversion: numerical parity with the PyTorch models of each family, exact
export / import round trips, transformers loading our exports, the CLIP ViT-B/16 parameter
count, tokenizers, and errors that name unsupported options."""
import json
import os
import shutil

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import hf_reference as ref  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from vlm_jax.convert import hf, hf_io, rules, workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

TOL = 1e-5
FAMILIES = ('clip', 'siglip', 'vit', 'bert')
# Text rows as our tokenizer makes them: BOS, tokens, EOS, padding (ids filled per family).
TEXTS = ['a small red circle', 'two large green crosses to the left of a purple diamond']


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """family -> (folder, the PyTorch model)."""
  out = {}
  for family in FAMILIES:
    folder = str(tmp_path_factory.mktemp(family))
    out[family] = folder, ref.build(family, folder)
  return out


def _max_diff(ours, theirs, mask=None) -> float:
  diff = np.abs(np.asarray(ours, np.float64) - theirs.detach().numpy().astype(np.float64))
  if mask is not None:
    diff = diff * mask.reshape(mask.shape + (1,) * (diff.ndim - mask.ndim))
  return float(diff.max())


def _outputs(family, folder, model_pt):
  """(our outputs, PyTorch outputs) as dicts of comparable arrays and masks."""
  model, params, tokenizer = convert.load_hf(folder)
  apply = lambda *a, **k: model.apply({'params': params}, *a, **k)
  if family in ('clip', 'siglip'):
    size = 64 if family == 'clip' else 32
    images = ref.images(size=size)
    length = 16 if family == 'clip' else 8
    ids, mask = tokenizer.encode_batch(TEXTS, length)
    ours = apply(images, ids, mask)
    # SigLIP attends to padding (trained without a mask); CLIP masks it.
    kwargs = {} if family == 'siglip' else {
        'attention_mask': torch.from_numpy(mask.astype(np.int64))}
    with torch.no_grad():
      out = model_pt(input_ids=torch.from_numpy(ids.astype(np.int64)),
                     pixel_values=ref.nchw(images), **kwargs)
    logits = ours['logit_scale'] * ours['image_emb'] @ ours['text_emb'].T + ours['logit_bias']
    return {'image_emb': (ours['image_emb'], out.image_embeds, None),
            'text_emb': (ours['text_emb'], out.text_embeds, None),
            'logits_per_image': (logits, out.logits_per_image, None)}
  if family == 'vit':
    images = ref.images()
    ours = apply(images)
    with torch.no_grad():
      out = model_pt(pixel_values=ref.nchw(images))
    return {'last_hidden_state': (ours['tokens'], out.last_hidden_state, None),
            'pooler_output': (ours['pooler_output'], out.pooler_output, None)}
  ids, mask = tokenizer.encode_batch(TEXTS, 16)
  ours = apply(ids, mask)
  with torch.no_grad():
    out = model_pt(input_ids=torch.from_numpy(ids.astype(np.int64)),
                   attention_mask=torch.from_numpy(mask.astype(np.int64)),
                   output_hidden_states=True)
  # Padding positions attend to nothing useful in either model: compare real tokens.
  return {'hidden_states': (ours['tokens'], out.hidden_states[-1], mask),
          'mlm_logits': (ours['logits'], out.logits, mask)}


@pytest.mark.parametrize('family', FAMILIES)
def test_parity_with_pytorch(folders, family):
  folder, model_pt = folders[family]
  diffs = {name: _max_diff(o, t, m) for name, (o, t, m) in _outputs(family, folder,
                                                                    model_pt).items()}
  print(f'{family} max abs diff: {diffs}')
  assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize('family', FAMILIES)
def test_export_round_trip_is_exact_and_loads_in_transformers(folders, family, tmp_path):
  folder, model_pt = folders[family]
  config, params, tokenizer = hf.import_hf(folder)
  assert hf.export_hf(config, params, tokenizer, str(tmp_path)) == family
  original, exported = hf_io.read_weights(folder), hf_io.read_weights(str(tmp_path))
  assert set(exported) == set(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  _, params2, _ = hf.import_hf(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  cls = type(model_pt)
  reloaded, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  for (name, p), (_, q) in zip(reloaded.state_dict().items(), model_pt.state_dict().items()):
    assert torch.equal(p, q), name


def test_workdir_round_trip_through_the_cli(folders, tmp_path):
  """python -m vlm_jax.convert --from=hf, then --to=hf: the same weights, loadable."""
  from vlm_jax.convert import __main__ as cli_main  # pylint: disable=g-import-not-at-top
  folder, _ = folders['clip']
  work, back = str(tmp_path / 'work'), str(tmp_path / 'back')
  assert 'dual_encoder' in cli_main.import_folder(folder, work)
  assert {'config.json', 'params', 'tokenizer.json', 'special_tokens.json'} <= set(
      os.listdir(work))
  assert 'CLIPModel' in cli_main.export_workdir(work, back)
  original, exported = hf_io.read_weights(folder), hf_io.read_weights(back)
  assert all(np.array_equal(exported[k], v) for k, v in original.items())
  tok = transformers.AutoTokenizer.from_pretrained(back)
  ours = workdir.load(work)[2]
  ids, mask = ours.encode_batch(TEXTS, 16)
  theirs = tok(TEXTS, truncation=True, max_length=16)['input_ids']
  assert [list(row[m]) for row, m in zip(ids, mask)] == theirs


def test_clip_vit_b16_parameter_count():
  """Full size, without allocating: HF on the meta device, ours through jax.eval_shape."""
  from vlm_jax import cli  # pylint: disable=g-import-not-at-top
  hf_config = transformers.CLIPConfig(
      text_config=dict(), vision_config=dict(patch_size=16, image_size=224),
      projection_dim=512)
  with torch.device('meta'):
    model = transformers.CLIPModel(hf_config)
  theirs = sum(p.numel() for p in model.parameters())
  config = convert.FAMILIES['clip'].config_from_hf(hf_config.to_dict(), '', set())
  ours = sum(int(np.prod(s)) for s in hf.param_shapes(config).values())
  assert ours == theirs == 149_620_737
  b16 = cli._load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                           'clip_vit_b16.py'))
  assert sum(int(np.prod(s)) for s in hf.param_shapes(b16).values()) == theirs


def _edit_config(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, 'config.json')
  config = json.load(open(path))
  edit(config)
  json.dump(config, open(path, 'w'))
  return str(dst)


@pytest.mark.parametrize('family,edit,match', [
    ('clip', lambda c: c['vision_config'].update(hidden_act='relu'),
     r"vision_config\.hidden_act='relu'"),
    ('bert', lambda c: c.update(is_decoder=True), r'is_decoder=True'),
    ('vit', lambda c: c.update(qkv_bias=False), r'qkv_bias=False'),
    ('siglip', lambda c: c['vision_config'].update(vision_use_head=False),
     r'vision_config\.vision_use_head=False'),
])
def test_unsupported_option_is_named(folders, tmp_path, family, edit, match):
  folder = _edit_config(folders[family][0], tmp_path / 'edited', edit)
  with pytest.raises(convert.UnsupportedOptionError, match=match):
    convert.load_hf(folder)


def test_unknown_family_and_extra_tensors(folders, tmp_path):
  folder = _edit_config(folders['vit'][0], tmp_path / 'swin', lambda c: c.update(
      model_type='swin'))
  with pytest.raises(convert.UnsupportedFamilyError, match="model_type 'swin'"):
    convert.load_hf(folder)
  # A BERT whose layers are fewer than its tensors: the leftovers are named, not dropped.
  folder = _edit_config(folders['bert'][0], tmp_path / 'short', lambda c: c.update(
      num_hidden_layers=1))
  with pytest.raises(rules.ConversionError, match=r'bert\.encoder\.layer\.1\.'):
    convert.load_hf(folder)


def test_converted_workdir_with_unknown_option_fails_clearly(folders, tmp_path):
  work = str(tmp_path / 'work')
  from vlm_jax.convert import __main__ as cli_main  # pylint: disable=g-import-not-at-top
  cli_main.import_folder(folders['vit'][0], work)
  path = os.path.join(work, 'config.json')
  config = json.load(open(path))
  config['model']['image']['rope_theta'] = 10000.0
  json.dump(config, open(path, 'w'))
  with pytest.raises(convert.WorkdirError, match=r"'model\.image\.rope_theta'"):
    workdir.load(work)


def test_tokenizers_match_transformers(folders):
  clip_folder, bert_folder = folders['clip'][0], folders['bert'][0]
  texts = ['A small red circle.', "what's   the colour of the star?", 'unseen wordz 42']
  cases = [(clip_folder, 'clip', transformers.CLIPTokenizer),
           (bert_folder, 'bert', transformers.BertTokenizer)]
  for folder, family, cls in cases:
    ours = convert.hf_tokenizer.load(folder, family)
    assert ours.vocab_size > 0
    ids, mask = ours.encode_batch(texts, 16)
    theirs = cls.from_pretrained(folder)(texts, padding='max_length', max_length=16,
                                         truncation=True)
    np.testing.assert_array_equal(ids, theirs['input_ids'], err_msg=family)
    np.testing.assert_array_equal(mask, theirs['attention_mask'], err_msg=family)


def test_siglip_tokenizer_has_no_bos(folders):
  tok = convert.hf_tokenizer.load(folders['siglip'][0], 'siglip')
  ids, mask = tok.encode_batch(['a red circle'], 8)
  assert tok.bos_id is None and ids[0, mask[0].sum() - 1] == tok.eos_id
  assert ids[0, 0] == tok.backend.token_to_id('a')


def test_empty_tokenizer_is_refused(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizers.Tokenizer(tokenizers.models.WordLevel({}, unk_token='[UNK]')).save(
      str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match='empty vocabulary|nothing beyond'):
    convert.hf_tokenizer.load(str(tmp_path), 'bert')


def test_layer_layout_follows_scan_layers(folders):
  """Converted per-layer blocks stack into the scanned layout and back, exactly."""
  config, params, _ = hf.import_hf(folders['clip'][0])
  stacked = hf.relayout(params, scan=True)
  config.model.scan_layers = True
  expected = hf.param_shapes(config)
  assert {k: v.shape for k, v in rules.flatten(stacked).items()} == expected
  jax.tree.map(np.testing.assert_array_equal, hf.relayout(stacked, scan=False), params)
