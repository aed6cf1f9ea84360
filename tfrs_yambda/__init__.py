"""Two-tower candidate retrieval for Yambda music listens, TFRS on Keras 2."""

import os

# TFRS needs Keras 2 (tf_keras); the switch must be set before TensorFlow loads.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
