"""The evaluation as one self-contained HTML page (a KFP ``HTML`` artifact, so the KFP UI shows it
too): figures drawn with matplotlib and embedded as PNG, so that a browser shows them with
nothing else at hand. What each figure shows is said under it; README's "The run report" lists
them."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are drawn to PNG only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from components.evaluate import Evaluation  # noqa: E402
from components.report import interval_text, percent  # noqa: E402

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
figure { display: inline-block; margin: 0 1.5rem 1.5rem 0; vertical-align: top; }
figcaption { font-size: 0.85rem; color: #555; max-width: 32rem; }
.grid figure { margin: 0 0.6rem 0.6rem 0; }
.grid img { width: 128px; height: 128px; }
table { border-collapse: collapse; }
td, th { padding: 0.2rem 0.6rem; border-bottom: 1px solid #ddd; }
"""


def figure_png(figure: plt.Figure) -> str:
    """The figure as a base64 PNG (and closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_figure(evaluation: Evaluation) -> str:
    """Confusion matrix as a heat map, counts in the cells (rows: true class)."""
    counts = np.asarray(evaluation.confusion)
    figure, axes = plt.subplots(figsize=(5, 4.2))
    shown = axes.imshow(counts, cmap="Blues")
    names = evaluation.class_names
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, column), value in np.ndenumerate(counts):
        colour = "white" if value > counts.max() / 2 else "black"
        axes.text(column, row, str(value), ha="center", va="center", color=colour)
    figure.colorbar(shown, ax=axes)
    return figure_png(figure)


def roc_figure(evaluation: Evaluation) -> str | None:
    """One-vs-rest ROC curve of every class (AUC in the legend)."""
    curves = {
        name: evaluation.roc[name] for name in evaluation.class_names if name in evaluation.roc
    }
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(5, 4.2))
    for name, curve in curves.items():
        auc = evaluation.per_class[name].auc if name in evaluation.per_class else None
        label = f"{name} (AUC {auc:.3f})" if auc is not None else name
        axes.plot(curve.fpr, curve.tpr, label=label)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.legend(loc="lower right", fontsize="small")
    return figure_png(figure)


def training_figure(history: Sequence[dict[str, Any]]) -> str | None:
    """Per-epoch loss and accuracy on the training and validation splits."""
    if not history:
        return None
    frame = pd.DataFrame(history)
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(9, 3.6))
    for split in ("train", "val"):
        if f"{split}_loss" in frame:
            loss.plot(frame["epoch"], frame[f"{split}_loss"], marker=".", label=split)
        if f"{split}_accuracy" in frame:
            accuracy.plot(frame["epoch"], frame[f"{split}_accuracy"], marker=".", label=split)
    for axes, what in ((loss, "loss"), (accuracy, "accuracy")):
        axes.set_xlabel("epoch")
        axes.set_ylabel(what)
        axes.legend()
    return figure_png(figure)


def balance_figure(split: pd.DataFrame | None, class_names: Sequence[str]) -> str | None:
    """Images of each class in each split (from the split manifest)."""
    if split is None or not {"split", "label"} <= set(split.columns):
        return None
    counts = split.groupby(["split", "label"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(class_names), fill_value=0)
    order = [name for name in ("train", "val", "test") if name in counts.index]
    counts = counts.reindex(order + [name for name in counts.index if name not in order])
    figure, axes = plt.subplots(figsize=(6, 3.6))
    counts.plot.bar(ax=axes, rot=0)
    axes.set_ylabel("images")
    axes.legend(fontsize="small")
    return figure_png(figure)


def _figure(png: str | None, name: str, caption: str) -> str:
    if not png:
        return ""
    return (
        f'<figure id="{name}"><img alt="{html.escape(caption)}" '
        f'src="data:image/png;base64,{png}"><figcaption>{html.escape(caption)}</figcaption>'
        "</figure>"
    )


def _grid(items: Sequence[tuple[str, str]], name: str) -> str:
    """Small images with a caption each."""
    if not items:
        return "<p>None.</p>"
    figures = [_figure(png, f"{name}-{i}", caption) for i, (png, caption) in enumerate(items)]
    return f'<div class="grid">{"".join(figures)}</div>'


def render_html(
    evaluation: Evaluation,
    split: pd.DataFrame | None = None,
    title: str = "Brain-MRI classifier evaluation",
) -> str:
    """The page: headline scores, then every figure (those with nothing to draw are left out)."""
    history = evaluation.model.get("metadata", {}).get("history", [])
    trust = evaluation.trust
    samples = [
        (e.overlay_png, f"{e.true_label}: {e.predicted_label} {e.confidence:.2f}")
        for e in evaluation.explained
        if e.correct and e.overlay_png
    ]
    mistakes = [
        (m.thumbnail_png, f"{m.true_label} as {m.predicted_label} ({m.confidence:.2f})")
        for m in evaluation.worst
        if m.thumbnail_png
    ]
    explained_mistakes = [
        (e.overlay_png, f"{e.true_label} as {e.predicted_label} {e.confidence:.2f}")
        for e in evaluation.explained
        if not e.correct and e.overlay_png
    ]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{percent(s.recall)} {interval_text(s.recall_ci)}</td>"
        f"<td>{percent(s.precision)}</td><td>{s.errors}</td><td>{s.support}</td></tr>"
        for name, s in evaluation.per_class.items()
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(evaluation.data)}: <b>accuracy {percent(evaluation.accuracy)}</b> "
        f"{interval_text(evaluation.accuracy_ci)}, {evaluation.errors} errors of "
        f"{evaluation.num_images}; "
        f"balanced accuracy {percent(evaluation.balanced_accuracy)}.</p>",
        "<table><tr><th>class</th><th>recall (95 % CI)</th><th>precision</th><th>errors</th>"
        f"<th>images</th></tr>{rows}</table>",
        "<h2>Scores</h2>",
        _figure(
            confusion_figure(evaluation),
            "confusion",
            "Confusion matrix: rows are the "
            "true class, columns the predicted one; off-diagonal cells are mistakes.",
        ),
        _figure(
            roc_figure(evaluation),
            "roc",
            "One-vs-rest ROC curve per class, from the calibrated probabilities.",
        ),
        _figure(
            trust.reliability_png if trust else None,
            "reliability",
            "Reliability diagram: confidence against accuracy, before and after the temperature.",
        ),
        "<h2>Training and data</h2>",
        _figure(
            training_figure(history),
            "training",
            "Loss and accuracy per epoch on the training and validation splits.",
        ),
        _figure(
            balance_figure(split, evaluation.class_names),
            "balance",
            "Images of each class in each split.",
        ),
        "<h2>Sample answers per class</h2><p>Right answers with the heatmap of the predicted "
        "class and its hottest box.</p>",
        _grid(samples, "sample"),
        "<h2>Worst mistakes</h2><p>The wrong answers given the highest confidence.</p>",
        _grid(mistakes, "mistake"),
        _grid(explained_mistakes, "explained-mistake") if explained_mistakes else "",
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)
