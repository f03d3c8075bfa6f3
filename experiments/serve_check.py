r"""Classifies the CIFAR-10 test split with an exported SavedModel.

  python experiments/serve_check.py runs/first/export/1 --data_dir=DIR

Runs in a process that imports only TensorFlow (and TFDS to read the data),
never `supcon_tf`: it checks that the export is self-contained and that its
accuracy on raw uint8 images and on JPEG bytes matches what the library
reported.
"""

import argparse
import json
import sys

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("export_dir")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--batch_size", type=int, default=500)
  args = parser.parse_args()
  served = tf.saved_model.load(args.export_dir)
  assert "supcon_tf" not in sys.modules
  default = served.signatures["serving_default"]
  from_bytes = served.signatures["serving_bytes"]
  test = tfds.load("cifar10", split="test", data_dir=args.data_dir,
                   as_supervised=True, download=False)
  correct_uint8 = correct_jpeg = agree = total = 0
  for images, labels in test.batch(args.batch_size):
    ids = default(images=images)["class_ids"].numpy()
    jpegs = tf.map_fn(lambda im: tf.io.encode_jpeg(im, quality=95), images,
                      fn_output_signature=tf.string)
    jpeg_ids = from_bytes(image_bytes=jpegs)["class_ids"].numpy()
    labels = labels.numpy()
    correct_uint8 += int(np.sum(ids == labels))
    correct_jpeg += int(np.sum(jpeg_ids == labels))
    agree += int(np.sum(ids == jpeg_ids))
    total += len(labels)
  print(json.dumps({"examples": total, "uint8_top1": correct_uint8 / total,
                    "jpeg_q95_top1": correct_jpeg / total,
                    "uint8_vs_jpeg_agreement": agree / total}, indent=2))


if __name__ == "__main__":
  main()
