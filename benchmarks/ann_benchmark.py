r"""ANN benchmark at catalogue scale: ScaNN vs BruteForce vs FAISS HNSW.

  python -m benchmarks.ann_benchmark --workdir=/tmp/tfrs_yambda/demo

Reads the demo run's exported BruteForce SavedModel (its candidate embeddings
and its query tower) and its prepared validation split, then:
  1. pads the ~33K real candidate embeddings to --num_items synthetic
     catalogue-like items: each is a real candidate plus isotropic Gaussian
     noise (cosine ~0.8 to its source), re-normalised, since the candidate
     tower outputs unit vectors;
  2. embeds --num_queries real validation requests with the query tower and
     takes exact top-k over the padded catalogue as the ground truth;
  3. measures, in this one process, recall@k against exact search, single-query
     p50/p99 latency and batch-of-256 queries/s of
       * the bare indices: exact matmul + top_k (what BruteForce runs), ScaNN
         (TF ops, as TFRS's ScaNN layer uses them) at several search settings,
         with TFRS's quantisation and with export.ScaNN's (anisotropic
         hashing, int8 rescoring),
         FAISS HNSW at several efSearch values;
       * SavedModels in the export layout (raw-id requests in, query tower
         included): BruteForce and ScaNN with `export.default_scann_options`.
Every figure is a median over repetitions, all from one run on one machine.
"""

import gc
import json
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

from absl import app
from absl import flags
import numpy as np

from export import export  # Sets TF_USE_LEGACY_KERAS before TF is imported.
import tensorflow as tf  # pylint: disable=g-bad-import-order
from tfrs_yambda import catalogue as catalogue_lib
from tfrs_yambda import evaluate
from tfrs_yambda import input_pipeline
from tfrs_yambda import schema

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this program's flags in `flag_values` (called by its main)."""
  fv = flag_values
  flags.DEFINE_string("workdir", "/tmp/tfrs_yambda/demo",
                      "A training run's workdir (export/ and prepared/).",
                      flag_values=fv)
  flags.DEFINE_string("model_name", "yambda", "Served model name prefix.",
                      flag_values=fv)
  flags.DEFINE_string("saved_model", None,
                      "A BruteForce SavedModel version folder to take the "
                      "query tower and candidates from (default: the latest "
                      "under <workdir>/export/<model_name>_bruteforce).",
                      flag_values=fv)
  flags.DEFINE_integer("num_items", 1_000_000, "Catalogue size after padding.",
                       flag_values=fv)
  flags.DEFINE_integer("num_queries", 1000, "Test requests used for recall.",
                       flag_values=fv)
  flags.DEFINE_integer("num_single", 300, "Single queries timed per method.",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 256, "Batch of the throughput figure.",
                       flag_values=fv)
  flags.DEFINE_integer("batch_repeats", 7, "Timed batches per method.",
                       flag_values=fv)
  flags.DEFINE_integer("k", 100, "Neighbours retrieved (recall@k).",
                       flag_values=fv)
  flags.DEFINE_float("noise_cosine", 0.8,
                     "Expected cosine of a synthetic item to its source item.",
                     flag_values=fv)
  flags.DEFINE_integer("threads", 2, "CPU threads for every library.",
                       flag_values=fv)
  flags.DEFINE_bool("hnsw", True, "Include FAISS HNSW (needs faiss-cpu).",
                    flag_values=fv)
  flags.DEFINE_bool("savedmodels", True, "Include the SavedModel rows.",
                    flag_values=fv)
  flags.DEFINE_bool("bare", True,
                    "Include the bare-index rows (a grid of ScaNN settings: "
                    "minutes per setting at millions of items).",
                    flag_values=fv)
  flags.DEFINE_list("scann_search", None,
                    "Instead of the grid's ScaNN rows: the export's ScaNN tree "
                    "for --num_items (export.default_scann_options), searched "
                    "with each LEAVES/RESCORED pair, e.g. 87/700,130/1000.",
                    flag_values=fv)
  flags.DEFINE_string("output_json", None, "Also write the rows here.",
                      flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the padding and the query sample.",
                       flag_values=fv)


def pad_catalogue(candidates: np.ndarray, num_items: int, noise_cosine: float,
                  rng: np.random.Generator) -> np.ndarray:
  """Real unit candidates + noisy unit copies of them, [num_items, d]."""
  extra = num_items - len(candidates)
  if extra <= 0:
    return candidates[:num_items]
  d = candidates.shape[1]
  # Noise of norm tan(acos(c)) around a unit vector gives cosine ~c to it.
  sigma = np.tan(np.arccos(noise_cosine)) / np.sqrt(d)
  source = rng.integers(0, len(candidates), extra)
  synthetic = candidates[source] + rng.normal(0, sigma, (extra, d)).astype(
      np.float32)
  synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
  return np.concatenate([candidates, synthetic]).astype(np.float32)


def load_requests(prepared: str, catalogue: catalogue_lib.Catalogue,
                  item_ids: np.ndarray, count: int,
                  rng: np.random.Generator) -> Dict[str, np.ndarray]:
  """Raw-id serving requests for `count` random validation examples (the
  index settings are chosen here, so never on the test day)."""
  examples = evaluate.load_examples(
      prepared, "validation", catalogue.history_length,
      input_pipeline.ExampleRule(
          min_played_ratio=catalogue.metadata["min_played_ratio"]),
      keys=[schema.USER_ID, schema.SEED_ITEM, schema.HISTORY_ITEMS])
  pick = rng.choice(len(examples[schema.USER_ID]), count, replace=False)
  return {
      schema.SERVING_USER_ID: examples[schema.USER_ID][pick],
      schema.SERVING_SEED_ITEM_ID: item_ids[examples[schema.SEED_ITEM][pick]],
      schema.SERVING_HISTORY_ITEM_IDS: item_ids[
          examples[schema.HISTORY_ITEMS][pick]],
  }


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
  """Indices of the exact top-k by dot product, [num_queries, k]."""
  items_t = tf.constant(items)
  out = []
  for start in range(0, len(queries), 256):
    scores = tf.matmul(queries[start:start + 256], items_t, transpose_b=True)
    out.append(tf.math.top_k(scores, k).indices.numpy())
  return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean share of the exact top-k found, per query."""
  return float(np.mean([len(np.intersect1d(f, t)) / len(t)
                        for f, t in zip(found, truth)]))


def time_batches(fn: Callable, batches: List, repeats: int) -> float:
  """Median seconds of one call on a batch (after one warm-up call each)."""
  for b in batches:
    fn(b)
  times = []
  for i in range(repeats):
    b = batches[i % len(batches)]
    start = time.perf_counter()
    fn(b)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def time_single(fn: Callable, singles: List) -> np.ndarray:
  """Per-call latencies in milliseconds over single-query calls."""
  for s in singles[:10]:
    fn(s)
  out = []
  for s in singles:
    start = time.perf_counter()
    fn(s)
    out.append(1e3 * (time.perf_counter() - start))
  return np.array(out)


def measure(name: str, search: Callable, truth: np.ndarray, queries,
            slicer: Callable, num_queries: int, build_s: float = 0.0) -> Dict:
  """recall@k, single-query p50/p99 (ms), batch queries/s of one method."""
  bs = FLAGS.batch_size
  found = np.concatenate([search(slicer(queries, s, s + bs))
                          for s in range(0, num_queries, bs)])
  batches = [slicer(queries, s, s + bs)
             for s in range(0, num_queries - bs + 1, bs)]
  batch_s = time_batches(search, batches, FLAGS.batch_repeats)
  singles = [slicer(queries, i, i + 1) for i in range(FLAGS.num_single)]
  lat = time_single(search, singles)
  row = {"method": name,
         "recall": recall(found, truth) if truth is not None else float("nan"),
         "p50_ms": float(np.percentile(lat, 50)),
         "p99_ms": float(np.percentile(lat, 99)),
         "qps": bs / batch_s, "build_s": build_s}
  print(f"  {name:<48} recall={row['recall']:.4f} p50={row['p50_ms']:.3f}ms "
        f"p99={row['p99_ms']:.3f}ms qps={row['qps']:.0f}", flush=True)
  return row


def _rows(x, a, b):
  return x[a:b]


def _request_rows(x, a, b):
  return {k: tf.constant(v[a:b]) for k, v in x.items()}


# (leaves, quantisation, [(leaves searched, candidates rescored), ...]):
# TFRS's defaults (plain AH, float32 rescoring) and export.ScaNN's.
_SCANN_GRID = (
    (1000, "float32", ((25, 500), (50, 500), (50, 1000), (100, 1000))),
    (1000, "AQ 0.2 + int8", ((30, 500), (40, 700), (50, 500), (50, 700),
                             (60, 700))),
    (2000, "AQ 0.2 + int8", ((100, 500), (100, 700))),
)


def bare_rows(items: np.ndarray, queries: np.ndarray, truth: np.ndarray,
              k: int) -> List[Dict]:
  """Bare-index rows: exact, ScaNN settings, HNSW settings."""
  rows = []
  n = len(queries)
  items_t = tf.constant(items)

  @tf.function(input_signature=[tf.TensorSpec([None, items.shape[1]])])
  def exact(q):
    return tf.math.top_k(tf.matmul(q, items_t, transpose_b=True), k).indices

  rows.append(measure("bare exact (matmul + top_k)",
                      lambda q: exact(q).numpy(), truth, queries, _rows, n))

  from scann.scann_ops.py import scann_ops  # pylint: disable=g-import-not-at-top
  from scann.scann_ops.py import scann_builder  # pylint: disable=g-import-not-at-top
  grid = _SCANN_GRID
  if FLAGS.scann_search:  # the export's tree, searched with these pairs
    grid = ((export.default_scann_options(len(items), k)["num_leaves"],
             "AQ 0.2 + int8", tuple(tuple(int(v) for v in pair.split("/"))
                                    for pair in FLAGS.scann_search)),)
  for leaves, quantization, settings in grid:
    start = time.perf_counter()
    builder = scann_ops.builder(items, k, "dot_product").tree(
        num_leaves=leaves, num_leaves_to_search=settings[0][0],
        training_iterations=12)
    if quantization == "float32":
      builder = builder.score_ah(2).reorder(settings[0][1])
    else:  # anisotropic hashing, int8 rescoring: what export.ScaNN adds
      builder = builder.score_ah(
          2, anisotropic_quantization_threshold=0.2).reorder(
              settings[0][1], quantize=scann_builder.ReorderType.INT8)
    searcher = builder.build()
    build_s = time.perf_counter() - start
    print(f"  ScaNN tree of {leaves} leaves ({quantization}) built in "
          f"{build_s:.0f}s", flush=True)
    for search_leaves, reorder in settings:
      def search(q, s=searcher, nl=search_leaves, r=reorder):
        return s.search_batched_parallel(
            q, final_num_neighbors=k, pre_reorder_num_neighbors=r,
            leaves_to_search=nl).indices.numpy()
      rows.append(measure(
          f"bare ScaNN {quantization} leaves={leaves} search={search_leaves} "
          f"reorder={reorder}", search, truth, queries, _rows, n, build_s))
    del searcher

  if FLAGS.hnsw:
    try:
      import faiss  # pylint: disable=g-import-not-at-top
    except ImportError:
      print("  faiss is not installed: no HNSW rows (pip install faiss-cpu)")
      return rows
    faiss.omp_set_num_threads(FLAGS.threads)
    start = time.perf_counter()
    # M=16 and efConstruction=40 keep the 1M-item build to a few minutes on
    # two cores; the recall/speed trade-off is then set by efSearch.
    hnsw = faiss.IndexHNSWFlat(items.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(items)
    build_s = time.perf_counter() - start
    print(f"  HNSW (M=16, efConstruction=40) built in {build_s:.0f}s",
          flush=True)
    for ef in (128, 256, 512):
      def search(q, ef=ef):
        params = faiss.SearchParametersHNSW(efSearch=ef)
        return hnsw.search(np.ascontiguousarray(q), k, params=params)[1]
      rows.append(measure(f"bare FAISS HNSW M=16 efSearch={ef}", search,
                          truth, queries, _rows, n, build_s))
  return rows


def save_indices(query_model, items: np.ndarray, identifiers: np.ndarray,
                 k: int, out_dir: str) -> List[Tuple[str, str, float]]:
  """Builds and saves a BruteForce and a ScaNN SavedModel over `items`.

  Returns [(label, path, seconds to build and save)].
  """
  options = export.default_scann_options(len(items), k)
  saved = []
  for kind in ("bruteforce", "scann"):
    start = time.perf_counter()
    index = export.build_index(kind, query_model, items, identifiers, k,
                               options)
    path = export.save(export.Servable(index, k), out_dir, f"bench_{kind}",
                       {"index": kind, "scann_options": options})
    del index
    saved.append((f"SavedModel ScaNN {json.dumps(options, sort_keys=True)}"
                  if kind == "scann" else "SavedModel BruteForce", path,
                  time.perf_counter() - start))
  return saved


def savedmodel_rows(saved: List[Tuple[str, str, float]],
                    requests: Dict[str, np.ndarray],
                    truth_ids: Optional[np.ndarray] = None) -> List[Dict]:
  """SavedModel rows: raw requests through each saved signature, loaded one
  at a time (at millions of items each holds the model's content table).
  Without `truth_ids`, the first model's lists are the truth (an exact
  index: BruteForce)."""
  n = len(requests[schema.SERVING_USER_ID])
  rows = []
  for label, path, build_s in saved:
    serve = tf.saved_model.load(path).signatures["serving_default"]

    def search(r, s=serve):
      return s(**r)["item_ids"].numpy()

    if truth_ids is None:
      truth_ids = np.concatenate([search(_request_rows(requests, a, a + 256))
                                  for a in range(0, n, 256)])
    rows.append(measure(label, search, truth_ids, requests, _request_rows, n,
                        build_s))
    del serve, search
    gc.collect()
  return rows


def format_table(rows: List[Dict], baseline: str) -> str:
  """A markdown table; speed-ups against the row named `baseline`."""
  base = next(r for r in rows if r["method"] == baseline)["qps"]
  lines = ["| method | recall@100 | p50 ms | p99 ms | queries/s (batch 256) "
           "| x BruteForce | build s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['recall']:.3f} |".replace("nan", "-") +
                 f" {r['p50_ms']:.2f} | "
                 f"{r['p99_ms']:.2f} | {r['qps']:,.0f} | {r['qps'] / base:.1f} "
                 f"| {r['build_s']:.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  started = time.perf_counter()
  tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
  tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
  rng = np.random.default_rng(FLAGS.seed)
  model_dir = os.path.join(FLAGS.workdir, "export",
                           f"{FLAGS.model_name}_bruteforce")
  served = tf.saved_model.load(FLAGS.saved_model or os.path.join(
      model_dir, str(export.next_version(model_dir) - 1)))
  candidates = served.index._candidates.numpy()  # pylint: disable=protected-access
  identifiers = served.index._identifiers.numpy()  # pylint: disable=protected-access
  prepared = os.path.join(FLAGS.workdir, "prepared")
  catalogue = catalogue_lib.load(os.path.join(prepared, "catalogue"))
  item_ids = np.r_[-1, identifiers].astype(np.int64)  # index i -> raw id
  requests = load_requests(prepared, catalogue, item_ids, FLAGS.num_queries,
                           rng)
  queries = np.concatenate([
      served.index.query_model(_request_rows(requests, s, s + 256)).numpy()
      for s in range(0, FLAGS.num_queries, 256)])
  items = pad_catalogue(candidates, FLAGS.num_items, FLAGS.noise_cosine, rng)
  # Padding gets new ids; a truncated catalogue (--num_items below the
  # export's, e.g. the played 3M of the 500m rehearsal's 9.4M) keeps its
  # first, most popular, items and their ids.
  all_ids = np.r_[identifiers[:len(items)], identifiers.max() + 1 +
                  np.arange(max(0, len(items) - len(identifiers)))
                  ].astype(np.int64)
  truth = exact_top_k(queries, items, FLAGS.k)
  print(f"{len(items)} items ({len(candidates)} real), d={items.shape[1]}, "
        f"{FLAGS.num_queries} real validation queries; "
        f"{100 * np.mean(truth < len(candidates)):.0f}% of exact top-{FLAGS.k} "
        "are real items", flush=True)

  rows = bare_rows(items, queries, truth, FLAGS.k) if FLAGS.bare else []
  if FLAGS.savedmodels:
    query_model = served.index.query_model
    # The query tower alone: the part of a request's time no index saves.
    rows.append(measure("SavedModel query tower only (no index)",
                        lambda r: query_model(r).numpy(), None, requests,
                        _request_rows, FLAGS.num_queries))
    with tempfile.TemporaryDirectory() as tmp:
      saved = save_indices(query_model, items, all_ids, FLAGS.k, tmp)
      # The loaded export is dropped before the saved models load: at the
      # 500m shape each holds a 4.9 GB content table.
      del served, query_model
      gc.collect()
      rows += savedmodel_rows(saved, requests, all_ids[truth])
  print()
  print(format_table(rows, "SavedModel BruteForce" if FLAGS.savedmodels
                     else "bare exact (matmul + top_k)"))
  print(f"\nTotal {time.perf_counter() - started:.0f}s")
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
