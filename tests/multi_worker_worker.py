"""One worker of the two-process MultiWorkerMirroredStrategy test.

Usage: multi_worker_worker.py MODE OUT_DIR, with TF_CONFIG set. MODE is
`steps` (feed fixed global batches, save the final weights) or `pretrain`
(run `train_lib.pretrain` with checkpoints in OUT_DIR).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf

import train_lib_test as common  # pylint: disable=g-import-not-at-top
from supcon_tf import train_lib


def main(mode, out_dir):
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  task = strategy.cluster_resolver.task_id
  if mode == "pretrain":
    result = train_lib.pretrain(common.tiny_config(), out_dir, strategy,
                                dataset_fn=common.synthetic_dataset_fn,
                                verbose=False)
    np.save(os.path.join(out_dir, f"loss-{task}.npy"), result.loss)
    return
  initial = np.load(os.path.join(out_dir, "initial.npz"))
  trainer = common.make_trainer(
      strategy, common.tiny_config(),
      [initial[f"arr_{i}"] for i in range(len(initial.files))])
  losses = common.train(trainer, 3)
  np.savez(os.path.join(out_dir, f"final-{task}.npz"),
           losses=np.array(losses), *common.weights(trainer))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
