"""The evaluation's Recall@k curves as a PNG (matplotlib, no display needed)."""

import os
from typing import Dict, Sequence

from matplotlib.backends import backend_agg
from matplotlib import figure

# Drawn first and in a fixed style so the reference lines read the same in
# every plot; other retrievers follow in the order given.
_STYLES = {
    "model": dict(color="C0", linewidth=2.5),
    "oracle": dict(color="black", linestyle="--", linewidth=1.5),
}


def write_recall_plot(curves: Dict[str, Sequence[float]], path: str,
                      title: str = "Next-track Recall@k") -> None:
  """Writes Recall@k against k (log scale) for every retriever to `path`.

  Args:
    curves: {"k": cut-offs, retriever name: Recall@k at each cut-off}, as
      `tfrs_yambda.evaluate.evaluate` returns under "recall_curve".
    path: the PNG file; written under a temporary name, then renamed.
    title: the plot's title.
  """
  ks = curves["k"]
  fig = figure.Figure(figsize=(7, 4.5), dpi=120)
  backend_agg.FigureCanvasAgg(fig)  # renders without pyplot's global state
  axes = fig.add_subplot()
  names = [n for n in curves if n != "k"]
  others = iter(f"C{i}" for i in range(1, 10))  # C0 is the model's
  for name in sorted(names, key=lambda n: (n not in _STYLES, names.index(n))):
    style = _STYLES.get(name) or dict(color=next(others), linewidth=1.5)
    axes.plot(ks, curves[name], label=name.replace("_", " "), **style)
  axes.set_xscale("log")
  axes.set_xlim(1, max(ks))
  axes.set_ylim(0, 1)
  axes.set_xlabel("k (items retrieved from the whole catalogue)")
  axes.set_ylabel("Recall@k")
  axes.set_title(title)
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(loc="upper left", fontsize="small")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    fig.savefig(f, format="png")
  os.replace(path + ".tmp", path)
