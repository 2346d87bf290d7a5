"""Writes scikit-learn's 1,797 real handwritten-digit scans as an image_text_folder.

  python experiments/make_digits_folder.py --out=data/digits
  python -m vlm_jax.train --config=configs/clip_folder.py --workdir=runs/clip_digits \
      --config.data.path=data/digits --config.data.image_size=32 \
      --config.eval.prompt_templates="('a scan of the handwritten digit {}',)"

The scans (`sklearn.datasets.load_digits`, shipped inside scikit-learn's wheel, so nothing
is downloaded) are 8x8 grayscale with 17 ink levels (0-16), written as 8-bit PNGs
(level * 255 / 16, white ink on black as scanned); the builder scales them up to
data.image_size. Each image has two captions, "a scan of the handwritten digit three" and
"a handwritten 3", and the label "three"; no split column, so the builder splits them.

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


def write_folder(out: str, scans: np.ndarray, targets: np.ndarray) -> int:
  """Writes OUT/images/NNNN.png and OUT/captions.csv; returns the number of rows."""
  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  rows = 0
  with open(os.path.join(out, 'captions.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'caption', 'label'])
    for i, (scan, digit) in enumerate(zip(scans, targets)):
      image = f'images/{i:04d}.png'
      Image.fromarray(scan, 'L').save(os.path.join(out, image))
      name = NAMES[digit]
      writer.writerow([image, f'a scan of the handwritten digit {name}', name])
      writer.writerow([image, f'a handwritten {digit}', name])
      rows += 2
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--out', required=True, help='folder to write (created if missing)')
  args = parser.parse_args()
  scans, targets = load_scans()
  rows = write_folder(args.out, scans, targets)
  print(f'Wrote {len(scans)} scans and {rows} caption rows to {args.out}')


if __name__ == '__main__':
  main()
