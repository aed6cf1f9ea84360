"""Raw Yambda parquet -> item catalogue + TFRecords, and a data generator."""

import os

# data_prep reads the schema from tfrs_yambda, which imports TensorFlow.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
