"""`PrepConfig`: everything the prep depends on besides its input.

Each field is defined once, with its default and its help text; the flags of
`python -m data_prep.prep` and of the training entry point are made from the
fields (`define_flags`, `from_flags`), so a new parameter needs no second
definition anywhere.
"""

import dataclasses
from typing import Any, Dict, Sequence

from absl import flags

from data_prep import rules


def _field(default: Any, help_text: str, flag_name: str = None,
           choices: Sequence[str] = None):
  """A PrepConfig field and its flag's help (and, where given, the flag's
  name when it is not the field's, and its allowed values)."""
  metadata = {"help": help_text}
  if flag_name:
    metadata["flag_name"] = flag_name
  if choices:
    metadata["choices"] = list(choices)
  return dataclasses.field(default=default, metadata=metadata)


# Fields of PrepConfig that change how the work runs, not what it produces.
EXECUTION_FIELDS = ("num_workers", "runner", "read_batch_rows")


@dataclasses.dataclass
class PrepConfig:
  """Everything the prep depends on besides the input (all flags)."""

  history_length: int = _field(
      50, "Positives of history each record's context provides.")
  chunk_length: int = _field(256, "Listens per record (before its context).")
  num_shards: int = _field(
      4, "TFRecord shards per split; users are hashed to shards.")
  test_window_seconds: int = _field(86_400, "Length of the test window.")
  gap_seconds: int = _field(
      1_800, "Gap before the test window and before the validation window.")
  last_timestamp: int = _field(
      0, "End of the test window (0: last event + 1s).")
  min_played_ratio: int = _field(
      rules.LISTEN_PLUS_RATIO,
      "Listens played at least this percent are positives.")
  validation_window_seconds: int = _field(
      86_400, "Length of the validation window before the test gap (0: none; "
      "training then runs up to the test gap).")
  metadata_items: bool = _field(
      True, "Also catalogue every item of the metadata files (the service "
      "catalogue's never-played candidates).")
  # The memory bound of a streaming worker.
  bucket_events: int = _field(
      8_000_000, "About this many events per bucket, the unit of work held in "
      "memory (about 150 bytes per event per worker).")
  num_workers: int = _field(
      0, "Worker processes (0: all cores, 1 for small inputs).")
  read_batch_rows: int = _field(
      1_000_000, "Rows per batch when streaming parquet input.")
  runner: str = _field(
      "local", "Where units of work run: a local process pool, or Spark "
      "(pyspark; the master comes from the Spark config).",
      flag_name="prep_runner", choices=("local", "spark"))
  nonfinite_embeddings: str = _field(
      "error", "NaN or inf in the normalized_embed of a catalogue item: an "
      "error naming the item and row, or 'missing': the item has no audio "
      "embedding (counted in prep_report.json).",
      choices=rules.NONFINITE_EMBEDDINGS)

  def as_dict(self) -> Dict[str, Any]:
    """Every field by name (what the catalogue's metadata records)."""
    return dataclasses.asdict(self)

  def output_dict(self) -> Dict[str, Any]:
    """The fields that decide what the prep writes (not how it runs)."""
    return {k: v for k, v in self.as_dict().items()
            if k not in EXECUTION_FIELDS}


def _flag_name(field: dataclasses.Field) -> str:
  return field.metadata.get("flag_name", field.name)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per `PrepConfig` field, with its default and help.

  The flag has the field's name (runner: --prep_runner, which would be
  ambiguous in the training job's flags). Call it once, from a program's
  main module: the flags then exist only where a program wants them.

  Args:
    flag_values: where to define them.
  """
  for field in dataclasses.fields(PrepConfig):
    name, help_text = _flag_name(field), field.metadata["help"]
    if "choices" in field.metadata:
      flags.DEFINE_enum(name, field.default, field.metadata["choices"],
                        help_text, flag_values=flag_values)
    elif isinstance(field.default, bool):  # before int: a bool is an int
      flags.DEFINE_bool(name, field.default, help_text,
                        flag_values=flag_values)
    elif isinstance(field.default, int):
      flags.DEFINE_integer(name, field.default, help_text,
                           flag_values=flag_values)
    else:
      flags.DEFINE_string(name, field.default, help_text,
                          flag_values=flag_values)


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> PrepConfig:
  """The `PrepConfig` of the flags `define_flags` defined (after parsing).

  Args:
    flag_values: the parsed flags.

  Returns:
    A PrepConfig with every field from its flag.
  """
  return PrepConfig(**{field.name: flag_values[_flag_name(field)].value
                       for field in dataclasses.fields(PrepConfig)})
