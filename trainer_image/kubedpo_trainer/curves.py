"""The training-curve picture written beside a run's output: loss, reward accuracy, margin vs step.

A PNG rather than an interactive page: it opens anywhere (file viewer, S3 console, a PR comment)
and needs no server. Train values are the logged steps (`training.loggingSteps`), eval values
every evaluation, including the one at step 0 when `evalOnStart` is set. matplotlib's Agg
backend draws without a display, so the same code runs in a pod and on a laptop.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

FILENAME = "training_curves.png"

# (title, train key, eval key); the y-range of accuracy is fixed so runs compare at a glance.
PANELS = (
    ("DPO loss", "loss", "eval_loss"),
    ("reward accuracy", "rewards_accuracies", "eval_rewards_accuracies"),
    ("reward margin", "rewards_margins", "eval_rewards_margins"),
)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def render_png(train: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]],
               title: str = "") -> bytes:
    """PNG bytes of three panels (train line, eval markers); rows carry 'step' and metric keys."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods or CI; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4), dpi=100)
    try:
        for ax, (name, train_key, eval_key) in zip(axes, PANELS, strict=True):
            xs, ys = _series(train, train_key)
            if xs:
                ax.plot(xs, ys, label="train", color="tab:blue", linewidth=1.5)
            xs, ys = _series(evals, eval_key)
            if xs:
                ax.plot(xs, ys, label="eval", color="tab:orange", marker="o", linewidth=1.2)
            if train_key == "rewards_accuracies":
                ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="coin flip")
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(name)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
