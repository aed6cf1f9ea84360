r"""Raw Yambda folder -> item catalogue + TFRecord shards, out of core.

  python -m data_prep.prep --yambda_dir=/data/yambda --size=500m \
      --output_dir=/data/prepared/500m [--num_workers=16] [--prep_runner=spark]

What it decides (and records in the catalogue's metadata.json) is written
once, in `data_prep.rules` and `data_prep.records_plan`, which the in-memory
reference (benchmarks/reference_prep.py) calls too: the time split, the
positive rule, explicit feedback as each window may know it, the catalogue's
order and contents, and how listens become records. Only the data flow
differs.

Passes, one module each. Memory is bounded by --bucket_events and
--read_batch_rows, never by the input: every pass streams, and only one
bucket's rows per worker are in memory.
  1. scan: validate the input (`validation`) and partition it by a hash of
     uid into buckets (`buckets`).
  2. stats: per bucket, counts for the catalogue and the report.
  3. catalogue: one global merge of the bucket stats -> item order,
     vocabularies, metadata, audio.npy.
  4. records: per bucket, tf.train.Example chunks of each window; a shard's
     file is its buckets' files joined.
  5. finalize: prep_report.json, work files removed, folder renamed.
`runner` runs them (`prepare`) inline, on a process pool or on Spark; `work`
keeps the work folder, so an interrupted run resumes; `config` is the
configuration (`PrepConfig`) and its flags.

Output folder (built under <output_dir>.tmp and renamed when complete):
  catalogue/                 see tfrs_yambda.catalogue
  records/train-SSSSS-of-NNNNN.tfrecord, records/validation-...,
  records/test-...           see tfrs_yambda.schema
  prep_report.json           counts of everything kept and dropped, with reasons
"""

__all__ = ["PrepConfig", "STAGES", "config_from_flags", "define_config_flags",
           "prepare"]

# define_config_flags and config_from_flags are the names the training entry
# point used before the flags moved to `data_prep.prep.config` (define_flags,
# from_flags); they stay until it switches.
from data_prep.prep.config import define_flags as define_config_flags
from data_prep.prep.config import from_flags as config_from_flags
from data_prep.prep.config import PrepConfig
from data_prep.prep.runner import prepare
from data_prep.prep.runner import STAGES
