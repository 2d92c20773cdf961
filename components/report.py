"""The evaluation report, as Markdown for the KFP UI: metrics, per-class scores, the confusion
matrix, the worst mistakes inline, and the model card; and the Markdown tables every report of
the pipeline is made of."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.evaluate import Evaluation

# the KFP UI truncates Markdown beyond 400,000 characters; stay well inside it
MAX_REPORT_CHARS = 300_000


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def interval_text(interval: tuple[float, float] | None) -> str:
    """A 95 % interval as ``95.1–97.3 %``."""
    return "n/a" if interval is None else f"{100 * interval[0]:.1f}–{100 * interval[1]:.1f} %"


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table, one string per line."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _model_card(evaluation: Evaluation) -> list[str]:
    info = evaluation.model
    meta = info.get("metadata", {})
    config = meta.get("train_config", {})
    data = meta.get("data", {})
    history = meta.get("history", [])
    preprocess = info.get("preprocess", {})
    lines = ["## Model card", ""]
    lines += markdown_table(
        ("field", "value"),
        [
            ("backbone", f"`{info.get('backbone', '?')}`"),
            ("pretrained weights", f"`{meta.get('pretrained_weights') or 'none (random init)'}`"),
            ("version", meta.get("version", "not promoted yet")),
            (
                "input",
                f"{preprocess.get('image_size', '?')} px {preprocess.get('mode', 'RGB')}, "
                f"mean {preprocess.get('mean')}, std {preprocess.get('std')}",
            ),
            ("dataset fingerprint", f"`{data.get('dataset_fingerprint') or 'n/a'}`"),
            ("split fingerprint", f"`{data.get('split_fingerprint', 'n/a')}`"),
            ("split sizes", data.get("split_sizes", "n/a")),
            ("training set per class", data.get("class_counts", {}).get("train", "n/a")),
            ("evaluated on", f"`{evaluation.data}` ({evaluation.num_images} images)"),
            ("best validation accuracy", percent(meta.get("best_val_accuracy"))),
            ("best epoch", f"{meta.get('best_epoch', '?')} of {len(history)} run"),
            ("training time", f"{meta.get('training_seconds', 0) / 60:.1f} min"),
            ("training throughput", f"{meta.get('train_images_per_s', 0):.1f} images/s"),
            ("device", meta.get("device", "?")),
        ],
    )
    if config:
        lines += ["", "Hyper-parameters:", ""]
        lines += markdown_table(("parameter", "value"), sorted(config.items()))
    if meta.get("augment"):
        lines += ["", "Augmentation (training only):", ""]
        lines += markdown_table(("parameter", "value"), sorted(meta["augment"].items()))
    lines += [
        "",
        "Intended use: research and MLOps demonstration on 2-D brain-MRI slices of the four "
        "classes above. Not a medical device; not validated for diagnosis. Scores hold for data "
        "like the training distribution (the public Kaggle 'Brain Tumor MRI' collection).",
    ]
    return lines


def render_report(evaluation: Evaluation, title: str = "Brain-MRI classifier evaluation") -> str:
    """Markdown for the KFP UI: metrics, per-class scores, confusion matrix, worst errors inline
    (base64 PNG thumbnails), and the model card. Kept under :data:`MAX_REPORT_CHARS`."""
    names = evaluation.class_names
    lines = [f"# {title}", "", f"Data: `{evaluation.data}`, {evaluation.num_images} images.", ""]
    lines += markdown_table(
        ("metric", "value", "95 % interval", "errors"),
        [
            (
                "accuracy",
                percent(evaluation.accuracy),
                f"{interval_text(evaluation.accuracy_ci)} (Wilson)",
                f"{evaluation.errors} of {evaluation.num_images}",
            ),
            (
                "balanced accuracy",
                percent(evaluation.balanced_accuracy),
                f"{interval_text(evaluation.balanced_accuracy_ci)} (bootstrap)",
                "",
            ),
            ("macro AUC (one-vs-rest)", percent(evaluation.macro_auc), "", ""),
        ],
    )
    lines += ["", "## Per class", ""]
    lines += markdown_table(
        ("class", "recall", "95 % interval", "errors", "precision", "F1", "AUC", "images"),
        [
            (
                n,
                percent(s.recall),
                interval_text(s.recall_ci),
                s.errors,
                percent(s.precision),
                percent(s.f1),
                percent(s.auc),
                s.support,
            )
            for n, s in evaluation.per_class.items()
        ],
    )
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", ""]
    lines += markdown_table(
        ("true \\ predicted", *names),
        [(names[i], *row) for i, row in enumerate(evaluation.confusion)],
    )
    card = ["", *_model_card(evaluation)]
    lines += _trust_section(evaluation)
    lines += ["", "## Most confident mistakes", ""]
    if not evaluation.worst:
        lines.append("None: every image was classified correctly.")
    else:
        rows = []
        budget = MAX_REPORT_CHARS - len("\n".join(lines + card)) - 2_000
        for m in evaluation.worst:
            image = f"![{m.true_label}](data:image/png;base64,{m.thumbnail_png})"
            if not m.thumbnail_png or len(image) > budget:
                image = "(not shown)"
            budget -= len(image)
            rows.append(
                (image, f"`{m.path}`", m.true_label, m.predicted_label, percent(m.confidence))
            )
        lines += markdown_table(("image", "file", "true", "predicted", "confidence"), rows)
    lines += _evidence_section(evaluation, MAX_REPORT_CHARS - len("\n".join(lines + card)) - 1_000)
    return "\n".join(lines + card) + "\n"


def _trust_section(evaluation: Evaluation) -> list[str]:
    """Calibration before and after the temperature, the sets' coverage and the flags."""
    trust = evaluation.trust
    if trust is None:
        return []
    o = trust.overall
    target = percent(trust.coverage_target) if trust.coverage_target else "none fitted"
    lines = ["", "## Calibration and uncertainty", ""]
    lines += markdown_table(
        ("figure", "value"),
        [
            ("temperature (fitted on validation)", f"{trust.temperature:.3f}"),
            (
                "ECE, 15 bins: before / after",
                f"{percent(trust.before.ece)} / {percent(trust.after.ece)}",
            ),
            ("NLL: before / after", f"{trust.before.nll:.4f} / {trust.after.nll:.4f}"),
            ("Brier: before / after", f"{trust.before.brier:.4f} / {trust.after.brier:.4f}"),
            (
                "prediction-set coverage (target)",
                f"{percent(o.coverage)} ({target})",
            ),
            ("mean set size; empty sets", f"{o.mean_set_size:.3f}; {percent(o.empty_sets)}"),
            ("right answers flagged uncertain", f"{percent(o.right_flagged)} of {o.right}"),
            ("wrong answers flagged uncertain", f"{percent(o.wrong_flagged)} of {o.wrong}"),
            ("rejected as not a brain MRI", percent(o.rejected)),
        ],
    )
    lines += ["", "Per class:", ""]
    lines += markdown_table(
        ("class", "coverage", "mean set size", "right flagged", "wrong flagged", "images"),
        [
            (
                n,
                percent(r.coverage),
                f"{r.mean_set_size:.2f}",
                percent(r.right_flagged),
                f"{percent(r.wrong_flagged)} of {r.wrong}",
                r.images,
            )
            for n, r in trust.per_class.items()
        ],
    )
    if trust.reliability_png:
        lines += ["", f"![reliability diagram](data:image/png;base64,{trust.reliability_png})"]
    return lines


def _evidence_section(evaluation: Evaluation, budget: int) -> list[str]:
    """The worst mistakes and a few right answers with the heatmap of their predicted class."""
    if not evaluation.explained:
        return []
    lines = [
        "",
        "## Where the evidence is",
        "",
        "Class-activation heatmap of the predicted class (red: strongest evidence), its hottest "
        "region boxed in yellow.",
        "",
    ]
    rows = []
    for shown in evaluation.explained:
        image = f"![{shown.predicted_label}](data:image/png;base64,{shown.overlay_png})"
        if len(image) > budget:
            image = "(not shown)"
        budget -= len(image)
        verdict = "right" if shown.correct else "wrong"
        rows.append(
            (
                image,
                f"`{shown.path}`",
                shown.true_label,
                shown.predicted_label,
                percent(shown.confidence),
                verdict,
            )
        )
    return lines + markdown_table(
        ("heatmap", "file", "true", "predicted", "confidence", "answer"), rows
    )
