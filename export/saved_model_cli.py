r"""`saved_model_cli` with ScaNN's TF ops registered, for the ScaNN export.

Stock `saved_model_cli run` fails on the ScaNN SavedModel with "Op type not
registered 'Scann>ScannSearchBatched'": the ops live in ScaNN's shared library,
which only `import scann` loads. Same arguments as saved_model_cli:

  python -m export.saved_model_cli run \
      --dir /tmp/tfrs_yambda/demo/export/yambda_scann/1 --tag_set serve \
      --signature_def serving_default \
      --input_exprs 'user_id=[1];seed_item_id=[2];history_item_ids=[[3,-1]]'
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from export import client  # pylint: disable=g-import-not-at-top


def main():
  if not client.load_scann_ops():
    sys.exit("scann is not installed: pip install scann")
  from tensorflow.python.tools import saved_model_cli  # pylint: disable=g-import-not-at-top
  sys.argv[0] = "saved_model_cli"
  return saved_model_cli.main()


if __name__ == "__main__":
  sys.exit(main())
