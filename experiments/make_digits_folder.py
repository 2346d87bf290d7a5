"""Writes scikit-learn's 1,797 real handwritten-digit scans as an image_text_folder.

  python experiments/make_digits_folder.py --out=data/digits [--wordings=varied]
  python -m vlm_jax.train --config=configs/clip_folder.py --workdir=runs/clip_digits \
      --config.data.path=data/digits --config.data.image_size=32

The scans (`sklearn.datasets.load_digits`, shipped inside scikit-learn's wheel, so nothing
is downloaded) are 8x8 grayscale with 17 ink levels (0-16), written as 8-bit PNGs
(level * 255 / 16, white ink on black as scanned); the builder scales them up to
data.image_size. Each image has the label "three" and two captions: with --wordings=fixed
(the default), "a scan of the handwritten digit three" and "a handwritten 3"; with
--wordings=varied, two different wordings of VARIED_WORDINGS ("a handwritten three", "the
digit three", "a scan of the number three", ...) drawn per image from --seed. No split
column, so the builder splits them.

scikit-learn is not a dependency of vlm_jax: install it (`pip install scikit-learn`) to run
this script.
"""
import argparse
import csv
import os
import sys

import numpy as np
from PIL import Image

NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
FIXED_WORDINGS = ('a scan of the handwritten digit {name}', 'a handwritten {digit}')
VARIED_WORDINGS = ('a handwritten {name}', 'the digit {name}', 'a scan of the number {name}',
                   'the handwritten number {name}', 'a scanned digit {name}',
                   'a {name} written by hand')


def load_scans() -> tuple[np.ndarray, np.ndarray]:
  """uint8 [1797, 8, 8] scans (0-255) and int [1797] digits."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit('error: this script reads the digit scans shipped with scikit-learn, which is '
             'not a vlm_jax dependency; run `pip install scikit-learn` first.')
  digits = load_digits()
  scans = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return scans, digits.target


def caption_wordings(num_images: int, wordings: str, seed: int = 0) -> list[tuple[str, str]]:
  """The two caption wordings (format strings of `name` and `digit`) of each image: the
  same two for 'fixed'; for 'varied', two different ones of VARIED_WORDINGS per image,
  drawn with `seed` (the same seed gives the same wordings)."""
  if wordings == 'fixed':
    return [FIXED_WORDINGS] * num_images
  if wordings != 'varied':
    raise ValueError(f"wordings must be 'fixed' or 'varied', got {wordings!r}.")
  rng = np.random.default_rng(seed)
  picks = [rng.choice(len(VARIED_WORDINGS), 2, replace=False) for _ in range(num_images)]
  return [(VARIED_WORDINGS[a], VARIED_WORDINGS[b]) for a, b in picks]


def write_folder(out: str, scans: np.ndarray, targets: np.ndarray, wordings: str = 'fixed',
                 seed: int = 0) -> int:
  """Writes OUT/images/NNNN.png and OUT/captions.csv; returns the number of rows."""
  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  rows = 0
  with open(os.path.join(out, 'captions.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'caption', 'label'])
    pairs = caption_wordings(len(scans), wordings, seed)
    for i, (scan, digit, pair) in enumerate(zip(scans, targets, pairs)):
      image = f'images/{i:04d}.png'
      Image.fromarray(scan, 'L').save(os.path.join(out, image))
      name = NAMES[digit]
      for wording in pair:
        writer.writerow([image, wording.format(name=name, digit=digit), name])
        rows += 1
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--out', required=True, help='folder to write (created if missing)')
  parser.add_argument('--wordings', choices=('fixed', 'varied'), default='fixed',
                      help="captions: 'fixed' (two per image, the same wordings for all) or "
                           "'varied' (two of VARIED_WORDINGS per image, drawn with --seed)")
  parser.add_argument('--seed', type=int, default=0, help='seed of --wordings=varied')
  args = parser.parse_args()
  scans, targets = load_scans()
  rows = write_folder(args.out, scans, targets, args.wordings, args.seed)
  print(f'Wrote {len(scans)} scans and {rows} caption rows to {args.out}')


if __name__ == '__main__':
  main()
