"""Multimodal search over a dataset with a trained model, stored in Milvus Lite.

  python -m vlm_jax.search index --workdir=runs/clip_shapes --data=shapes:test
      --db=runs/search.db
  python -m vlm_jax.search query --db=runs/search.db --text="a red circle" --k=5
  python -m vlm_jax.search query --db=runs/search.db --image=scene.png --json
  python -m vlm_jax.search query --db=runs/search.db --image=scene.png --target=captions
  python -m vlm_jax.search export --db=runs/search.db --out=runs/search_export

`index` embeds the split's images and captions (collections NAME and NAME_captions, NAME
from --collection or NAME_SPLIT) and replaces any earlier index of that name. `query` embeds
a text or an image file (any size and mode: converted to RGB and resized) with the model
that built the index, and prints the top k with their cosine scores. `export` writes the
embeddings as .npy and their metadata as .jsonl. See `vlm_jax/inference/search.py`.
"""
import json
import logging

from absl import flags

from vlm_jax import cli

COMMANDS = ('index', 'query', 'export')

_WORKDIR = flags.DEFINE_string('workdir', None, 'index: workdir of a trained (or converted) '
                               'model. query: embed the query with this workdir instead of '
                               'the one that built the index (it must hold the same model).')
_DATA = flags.DEFINE_string('data', None, 'index: NAME:SPLIT of the dataset to index, e.g. '
                            'shapes:test, or FOLDER:SPLIT of an image-text folder or shards.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', "index: where the dataset is built; '' = the "
                                "workdir config's data.data_dir.")
_MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 0, 'index: the first N examples of the '
                                     'split; 0 = all.', lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 0, "index: embedding batch size; 0 = the "
                                   "config's eval.batch_size.", lower_bound=0)
_DB = flags.DEFINE_string('db', None, 'The Milvus Lite database: a path ending in .db (a '
                          'directory, created by index).')
_COLLECTION = flags.DEFINE_string('collection', '', "Index name inside --db. index: '' = "
                                  "NAME_SPLIT; query/export: '' = the only index in --db.")
_TEXT = flags.DEFINE_string('text', '', 'query: find the images (or captions) closest to this '
                            'text.')
_IMAGE = flags.DEFINE_string('image', '', 'query: find the images (or captions) closest to '
                             'this image file.')
_TARGET = flags.DEFINE_enum('target', 'images', ['images', 'captions'], 'query: search the '
                            "index's images or its captions.")
_K = flags.DEFINE_integer('k', 10, 'query: how many results.', lower_bound=1,
                          upper_bound=16384)
_JSON = flags.DEFINE_boolean('json', False, 'query: print a JSON list of {id, score, caption, '
                             'label, image} instead of a table.')
_OUT = flags.DEFINE_string('out', None, 'export: directory for NAME.npy, NAME.jsonl, '
                           'NAME_captions.npy, NAME_captions.jsonl and NAME.json.')


def _require(**values) -> None:
  missing = [f'--{name}' for name, value in values.items() if not value]
  if missing:
    raise cli.UserError(f'{" and ".join(missing)} required for this command; see '
                        'python -m vlm_jax.search --help')


def _format(hits: list[dict]) -> str:
  lines = [f'{"rank":>4}  {"score":>7}  {"id":>6}  {"label":<16}  {"image":<28}  caption']
  for rank, hit in enumerate(hits, 1):
    lines.append(f'{rank:>4}  {hit["score"]:7.4f}  {hit["id"]:>6}  {hit["label"] or "-":<16}  '
                 f'{hit["image"] or "-":<28}  {hit["caption"] or ""}')
  return '\n'.join(lines)


def run_command(command: str) -> None:
  from vlm_jax.inference import search  # pylint: disable=g-import-not-at-top
  _require(db=_DB.value)
  if command == 'index':
    _require(workdir=_WORKDIR.value, data=_DATA.value)
    search.parse_data(_DATA.value)  # a bad spec fails before the slow model load
    model = search.SearchModel(_WORKDIR.value, _BATCH_SIZE.value)
    stats = search.build_index(model, _DB.value, _DATA.value, _COLLECTION.value,
                               _DATA_DIR.value, _MAX_EXAMPLES.value)
    print(f'Indexed {stats["images"]} images and {stats["captions"]} captions '
          f'({stats["embed_dim"]}-d) of {_DATA.value} into {_DB.value} as '
          f'{stats["collection"]!r} in {stats["total_s"]:.1f} s (embedding '
          f'{stats["embed_s"]:.1f} s, inserting {stats["insert_s"]:.1f} s).')
  elif command == 'query':
    hits = search.query(_DB.value, text=_TEXT.value.strip(), image=_IMAGE.value, k=_K.value,
                        collection=_COLLECTION.value, target=_TARGET.value,
                        workdir=_WORKDIR.value or '')
    print(json.dumps(hits, indent=2) if _JSON.value else _format(hits))
  else:
    _require(out=_OUT.value)
    for name, rows in search.export(_DB.value, _OUT.value, _COLLECTION.value).items():
      print(f'{name}: {rows} rows -> {_OUT.value}/{name}.npy, {name}.jsonl')


def main(argv: list[str]) -> None:
  logging.getLogger().setLevel(logging.WARNING)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise cli.UserError(f'Give one command: {" | ".join(COMMANDS)} (got {argv[1:]}); see '
                        'python -m vlm_jax.search --help')
  from vlm_jax.inference import search  # pylint: disable=g-import-not-at-top
  try:
    run_command(argv[1])
  except search.SearchError as e:
    raise cli.UserError(str(e)) from None


if __name__ == '__main__':
  cli.run(main, positional=1)
