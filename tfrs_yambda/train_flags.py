"""The main job's command line: its flags, and the configs they become.

`tfrs_yambda.train` runs the stages; this module says what each of its
flags means and which stage's config it sets:

  data         --workdir, --yambda_dir, --size, --generate, --prepared_dir,
               and the prep's own (`data_prep.prep.config.PrepConfig`);
  training     `trainer.TrainConfig` (`train_config`);
  towers       `towers.TowerConfig` (`tower_config`);
  retrieval    `model.RetrievalConfig` (`retrieval_config`);
  examples     `input_pipeline.ExampleRule` (`example_rule`);
  evaluation   --eval_ks, --yambda_protocol, ... (ItemKNN: `itemknn_config`;
               the priors' choice: `priors.define_flags`);
  export       --export, --fresh_export_process, --export_k, --model_name.

No flag is defined on import: a program calls `define_flags` before it
parses its command line, so any modules can be imported together.
"""

from absl import app
from absl import flags

from data_prep.prep import config as prep_config
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import input_pipeline
from tfrs_yambda import item_content
from tfrs_yambda import itemknn
from tfrs_yambda import model as model_lib
from tfrs_yambda import priors
from tfrs_yambda import towers
from tfrs_yambda import trainer
from tfrs_yambda import yambda_protocol

FLAGS = flags.FLAGS

# Flags that become the fields of the same name of a config.
TOWER_FLAGS = ("item_id_dim", "artist_dim", "album_dim", "user_dim",
               "hidden_dim", "output_dim", "recent_history", "history_encoder",
               "attention_blocks", "attention_heads", "attention_dropout",
               "candidate_history", "history_bonus", "artist_prior",
               "artist_prior_artists", "artist_prior_tracks",
               "successor_prior", "successor_prior_tracks", "query_heads",
               "min_item_count", "min_user_count", "content_dtype",
               "use_user_id", "use_seed", "use_history", "use_audio",
               "use_artist_album", "use_example_age")
RETRIEVAL_FLAGS = ("temperature", "logq_correction", "uniform_negatives",
                   "uniform_pool", "sampling_probability", "frequency_alpha",
                   "frequency_buckets")
# Recorded in TensorBoard's HParams dashboard, to compare runs (with the
# history length, which the prepared data defines).
HPARAM_FLAGS = ("batch_size", "epochs", "optimizer", "learning_rate",
                "use_example_weights", "history_length"
                ) + RETRIEVAL_FLAGS + TOWER_FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the job's flags, the prep's included, in `flag_values`.

  A flag that sets a config field takes its default from the config, so
  each default is written once.

  Args:
    flag_values: where to define them (the program's `flags.FLAGS`).
  """
  fv = flag_values
  train = trainer.TrainConfig()
  tower = towers.TowerConfig()
  retrieval = model_lib.RetrievalConfig()
  # Data: where the run reads and writes, and the prep (PrepConfig).
  flags.DEFINE_string("workdir", None,
                      "Where everything this run produces goes.",
                      flag_values=fv)
  flags.DEFINE_string("yambda_dir", None,
                      "Yambda folder (default: <workdir>/yambda).",
                      flag_values=fv)
  flags.DEFINE_string("size", "demo", "Which flat/<size>/ to use.",
                      flag_values=fv)
  flags.DEFINE_bool("generate", False,
                    "Generate a Yambda-layout dataset of --size into "
                    "--yambda_dir if it is not there (sizes: tiny, demo, "
                    "large, and 50m and 500m with the real ones' shapes).",
                    flag_values=fv)
  flags.DEFINE_integer("generator_seed", 0, "Seed of the generated dataset.",
                       flag_values=fv)
  flags.DEFINE_string("prepared_dir", None,
                      "Prepared data (default: <workdir>/prepared).",
                      flag_values=fv)
  prep_config.define_flags(flag_values)
  # Training: trainer.TrainConfig.
  flags.DEFINE_integer("batch_size", train.batch_size,
                       "Training batch (= in-batch negatives).",
                       flag_values=fv)
  flags.DEFINE_integer("epochs", train.epochs,
                       "Passes over the training examples.", flag_values=fv)
  flags.DEFINE_integer("max_train_steps", train.max_steps,
                       "0, or train at most this many steps in all: one "
                       "bounded pass, whose steady examples/s projects a "
                       "full epoch's time.", flag_values=fv)
  flags.DEFINE_enum("optimizer", train.optimizer, list(trainer.OPTIMIZERS),
                    "Optimizer.", flag_values=fv)
  flags.DEFINE_float("learning_rate", train.learning_rate,
                     "Peak learning rate.", flag_values=fv)
  flags.DEFINE_float("warmup_fraction", train.warmup_fraction,
                     "Share of steps with a linear learning-rate warm-up; the "
                     "rest decays by cosine.", flag_values=fv)
  flags.DEFINE_integer("shuffle_buffer", train.shuffle_buffer,
                       "Examples in the shuffle buffer.", flag_values=fv)
  flags.DEFINE_integer("checkpoint_every_steps", train.checkpoint_every_steps,
                       "Steps between backups an interrupted run resumes from.",
                       flag_values=fv)
  flags.DEFINE_list("profile_steps", [],
                    "Two step numbers FIRST,LAST: trace those training steps "
                    "with TensorFlow's profiler into <workdir>/logs/plugins "
                    "(TensorBoard's Profile tab, which needs "
                    "`pip install tensorboard-plugin-profile`).",
                    flag_values=fv)
  flags.DEFINE_bool("eval_every_epoch", train.eval_every_epoch,
                    "Evaluate the model on the validation day after every "
                    "epoch (TensorBoard), and keep the best epoch.",
                    flag_values=fv)
  flags.DEFINE_string("select_metric", train.select_metric,
                      "Validation metric that chooses the epoch to keep.",
                      flag_values=fv)
  flags.DEFINE_list("eval_ks", [str(k) for k in train.eval_ks],
                    "Recall@k cut-offs.", flag_values=fv)
  flags.DEFINE_integer("eval_examples", train.eval_examples,
                       "0: score every example of the validation and test "
                       "days; n: a fixed, seeded sample of n of each day's "
                       "examples (the same for every retriever and run), "
                       "each figure with its 95% interval. The Yambda "
                       "protocol still asks every user.", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_integer("seed", train.seed,
                       "Seed of initialisation and shuffling.", flag_values=fv)
  flags.DEFINE_bool("retrain", False,
                    "The authors' second stage: after choosing on the "
                    "validation day, retrain with the chosen settings and "
                    "epoch count on everything before the test gap, and score "
                    "the test day with that model.", flag_values=fv)
  # Retrieval task: model.RetrievalConfig.
  flags.DEFINE_float("temperature", retrieval.temperature,
                     "Softmax temperature (unit vectors).", flag_values=fv)
  flags.DEFINE_bool("logq_correction", retrieval.logq_correction,
                    "Correct in-batch scores by log sampling probability.",
                    flag_values=fv)
  flags.DEFINE_integer("uniform_negatives", retrieval.uniform_negatives,
                       "Negatives per step drawn uniformly from the catalogue "
                       "besides the in-batch ones (mixed negative sampling); "
                       "0: in-batch only.", flag_values=fv)
  flags.DEFINE_enum("uniform_pool", retrieval.uniform_pool,
                    list(model_lib.UNIFORM_POOLS),
                    "Draw uniform negatives from all items, or only those with "
                    "an id row of their own ('trained').", flag_values=fv)
  flags.DEFINE_enum("sampling_probability", retrieval.sampling_probability,
                    list(model_lib.SAMPLING_PROBABILITIES),
                    "Target frequencies of the logQ correction: the prepared "
                    "training counts, or estimated while training (Yi et al. "
                    "2019).", flag_values=fv)
  flags.DEFINE_float("frequency_alpha", retrieval.frequency_alpha,
                     "Moving-average rate of the streaming frequency estimate.",
                     flag_values=fv)
  flags.DEFINE_integer("frequency_buckets", retrieval.frequency_buckets,
                       "Hash buckets of the streaming frequency estimate "
                       "(item index mod buckets); 0: one per item.",
                       flag_values=fv)
  # Towers: towers.TowerConfig.
  for name, what in (("item_id_dim", "Item id embedding width."),
                     ("artist_dim", "Artist embedding width."),
                     ("album_dim", "Album embedding width."),
                     ("user_dim", "User embedding width."),
                     ("hidden_dim", "Hidden layer width of each tower."),
                     ("output_dim", "Query / candidate embedding width.")):
    flags.DEFINE_integer(name, getattr(tower, name), what, flag_values=fv)
  flags.DEFINE_integer("recent_history", tower.recent_history,
                       "Also pool the latest this many history items on their "
                       "own (0: only the whole history's mean).",
                       flag_values=fv)
  flags.DEFINE_enum("history_encoder", tower.history_encoder,
                    list(towers.HISTORY_ENCODERS),
                    "How the query tower reads the history: the mean of its "
                    "items' features, or causal self-attention over the "
                    "history and then the seed (SASRec in the tower).",
                    flag_values=fv)
  flags.DEFINE_integer("attention_blocks", tower.attention_blocks,
                       "Self-attention blocks of --history_encoder=attention.",
                       flag_values=fv)
  flags.DEFINE_integer("attention_heads", tower.attention_heads,
                       "Attention heads of each block.", flag_values=fv)
  flags.DEFINE_float("attention_dropout", tower.attention_dropout,
                     "Dropout rate inside the attention encoder.",
                     flag_values=fv)
  flags.DEFINE_bool("candidate_history", tower.candidate_history,
                    "Add to the query a learned, position-weighted sum of "
                    "the history's and the seed's candidate embeddings "
                    "(an item-item score, as ItemKNN's, in the towers).",
                    flag_values=fv)
  for name, what in (
      ("history_bonus", "a repeat prior over the history's own items, "
       "decaying with recency"),
      ("artist_prior", "a next-artist prior (the seed artist's next artists "
       "in training, their popular tracks)"),
      ("successor_prior", "a seed-successor prior (the seed's most frequent "
       "next tracks in training)")):
    flags.DEFINE_bool(name, getattr(tower, name), f"Mix {what} into the "
                      "model's scores, in evaluation and the export; sized "
                      "on the validation day after training.", flag_values=fv)
  for name, what in (("artist_prior_artists", "Next artists per artist in "
                      "the artist prior."),
                     ("artist_prior_tracks", "Tracks per artist in the "
                      "artist prior."),
                     ("successor_prior_tracks", "Next tracks per seed in the "
                      "successor prior.")):
    flags.DEFINE_integer(name, getattr(tower, name), what, lower_bound=1,
                         flag_values=fv)
  flags.DEFINE_integer("query_heads", tower.query_heads,
                       "Query vectors per example; a candidate scores the "
                       "best of them (max-sim), in training, evaluation and "
                       "the exported top-k.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("min_item_count", tower.min_item_count,
                       "Items with fewer training positives share one id row.",
                       flag_values=fv)
  flags.DEFINE_integer("min_user_count", tower.min_user_count,
                       "Users with fewer training positives share one id row.",
                       flag_values=fv)
  flags.DEFINE_enum("content_dtype", tower.content_dtype,
                    list(item_content.CONTENT_DTYPES),
                    "How the item content table (audio, length) is stored: "
                    "float16 halves the model's largest table.",
                    flag_values=fv)
  for name, what in (("use_user_id", "user id embedding"),
                     ("use_seed", "seed-track features"),
                     ("use_history", "history features"),
                     ("use_audio", "audio embeddings"),
                     ("use_artist_album", "artist and album embeddings"),
                     ("use_example_age", "example age")):
    flags.DEFINE_bool(name, getattr(tower, name), f"Ablation switch: {what}.",
                      flag_values=fv)
  # Examples: input_pipeline.ExampleRule (its positive threshold: the prep's).
  flags.DEFINE_integer("max_played_ratio", 200,
                       "Played-ratio cap (percent) in the example weight.",
                       flag_values=fv)
  flags.DEFINE_float("like_weight", 2.0, "Weight multiplier of liked listens.",
                     flag_values=fv)
  flags.DEFINE_bool("use_example_weights", True,
                    "Weight examples by played ratio and likes (else all 1).",
                    flag_values=fv)
  # Evaluation beyond the training's own.
  flags.DEFINE_float("recent_half_life_days", 7.0,
                     "Half-life of the recent-popularity baseline.",
                     flag_values=fv)
  knn = itemknn.ItemKNNConfig()
  flags.DEFINE_list("itemknn_neighbours", [str(k) for k in knn.neighbours],
                    "ItemKNN baseline: neighbourhood sizes K tried on the "
                    "validation day; the best by --select_metric scores the "
                    "test day (without a validation window, the largest).",
                    flag_values=fv)
  priors.define_flags(flag_values)
  flags.DEFINE_integer("itemknn_window", knn.window,
                       "ItemKNN counts each training positive with this many "
                       "positives before it.", flag_values=fv)
  flags.DEFINE_float("itemknn_seed_weight", knn.seed_weight,
                     "ItemKNN: a query's seed counts like this many history "
                     "items.", flag_values=fv)
  flags.DEFINE_integer("itemknn_max_pairs", knn.max_pairs,
                       "ItemKNN keeps at most this many distinct item pairs "
                       "while counting (16 bytes each); past it, the least "
                       "counted are dropped.", flag_values=fv)
  flags.DEFINE_integer("baseline_shards", 0,
                       "0: fit the baselines on every training shard; k: on "
                       "the first k, a hashed sample of users with all their "
                       "listens (one pass over ItemKNN's pairs of 500M "
                       "events is most of an hour on 2 cores).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_bool("yambda_protocol", True,
                    "Also score the Yambda authors' protocol: one query per "
                    "user from their state at the end of training, all their "
                    "test-window Listen+ items relevant.", flag_values=fv)
  flags.DEFINE_bool("validation_protocol", True,
                    "Score the Yambda protocol on the validation day too "
                    "(reported, never chosen on); at millions of items its "
                    "top-100 of every user takes minutes.", flag_values=fv)
  flags.DEFINE_list("protocol_ks", [str(k) for k in yambda_protocol.DEFAULT_KS],
                    "Cut-offs of the Yambda protocol (its top list is max k).",
                    flag_values=fv)
  flags.DEFINE_integer("projector_items", 20_000,
                       "Items written for TensorBoard's embedding projector "
                       "(most popular first, up to a tenth cold); 0: none.",
                       flag_values=fv)
  # Export.
  flags.DEFINE_bool("export", True, "Write the SavedModels after training.",
                    flag_values=fv)
  flags.DEFINE_bool("fresh_export_process", False,
                    "Export in a process of its own (export.from_checkpoint) "
                    "after the rest of the job ran in another: TensorFlow "
                    "keeps what a process frees, so an export after "
                    "evaluation in the same process peaks higher (19.2 "
                    "against 14.9 GiB at the 50m shape).", flag_values=fv)
  flags.DEFINE_integer("export_k", 100, "Items returned by the SavedModels.",
                       flag_values=fv)
  flags.DEFINE_string("model_name", "yambda", "Served model name prefix.",
                      flag_values=fv)


def train_config(flag_values: flags.FlagValues = FLAGS) -> trainer.TrainConfig:
  """--batch_size, --epochs, ... as a `trainer.TrainConfig`."""
  return trainer.TrainConfig(
      batch_size=flag_values.batch_size, epochs=flag_values.epochs,
      optimizer=flag_values.optimizer,
      learning_rate=flag_values.learning_rate,
      warmup_fraction=flag_values.warmup_fraction,
      shuffle_buffer=flag_values.shuffle_buffer,
      checkpoint_every_steps=flag_values.checkpoint_every_steps,
      profile_steps=profile_steps(flag_values.profile_steps),
      eval_every_epoch=flag_values.eval_every_epoch,
      select_metric=flag_values.select_metric,
      eval_ks=tuple(int(k) for k in flag_values.eval_ks),
      seed=flag_values.seed, max_steps=flag_values.max_train_steps,
      eval_examples=flag_values.eval_examples)


def profile_steps(value) -> tuple:
  """--profile_steps FIRST,LAST as a tuple; () for none."""
  if not value:
    return ()
  steps = [int(step) for step in value]
  if len(steps) != 2 or not 0 < steps[0] <= steps[1]:
    raise app.UsageError(f"--profile_steps takes FIRST,LAST with 0 < FIRST "
                         f"<= LAST, not {value}.")
  return tuple(steps)


def itemknn_config(flag_values: flags.FlagValues = FLAGS,
                   neighbours=None) -> itemknn.ItemKNNConfig:
  """--itemknn_* as an `itemknn.ItemKNNConfig` (`neighbours` overrides)."""
  return itemknn.ItemKNNConfig(
      neighbours=tuple(int(k) for k in neighbours or
                       flag_values.itemknn_neighbours),
      window=flag_values.itemknn_window,
      seed_weight=flag_values.itemknn_seed_weight,
      max_pairs=flag_values.itemknn_max_pairs)


def tower_config(flag_values: flags.FlagValues = FLAGS) -> towers.TowerConfig:
  """--item_id_dim, --use_history, ... as a `towers.TowerConfig`."""
  return towers.TowerConfig(**{
      name: flag_values[name].value for name in TOWER_FLAGS})


def retrieval_config(flag_values: flags.FlagValues = FLAGS
                     ) -> model_lib.RetrievalConfig:
  """--temperature, --uniform_negatives, ... as a `model.RetrievalConfig`."""
  return model_lib.RetrievalConfig(**{
      name: flag_values[name].value for name in RETRIEVAL_FLAGS})


def example_rule(catalogue: catalogue_lib.Catalogue,
                 flag_values: flags.FlagValues = FLAGS
                 ) -> input_pipeline.ExampleRule:
  """The examples' rule: the prep's positive threshold, the flags' weights."""
  return input_pipeline.ExampleRule(
      min_played_ratio=catalogue.metadata["min_played_ratio"],
      max_played_ratio=flag_values.max_played_ratio,
      like_weight=flag_values.like_weight,
      use_weights=flag_values.use_example_weights)


def hparams(catalogue: catalogue_lib.Catalogue,
            flag_values: flags.FlagValues = FLAGS) -> dict:
  """The settings recorded in TensorBoard's HParams dashboard."""
  return {name: (catalogue.history_length if name == "history_length"
                 else flag_values[name].value) for name in HPARAM_FLAGS}
