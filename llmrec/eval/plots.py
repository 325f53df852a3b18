"""curves.png: training (and validation) loss per stage, and the task's metrics against its baselines (the task draws
its own panels: `llmrec.tasks.Task.plot`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def draw_curves(path: Path, histories: dict[str, list[dict]], panels: list[Callable]) -> None:
    """Training (and validation) loss of every stage, one after another, then one panel per entry of `panels`
    (each draws into the matplotlib axis it is given: a task's metrics on one split against its baselines)."""
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(6 * (1 + len(panels)), 4.5), squeeze=False)
    loss_axis, metric_axes = axes[0][0], axes[0][1:]
    offset = 0
    for label, history in histories.items():
        train = [(h["step"] + offset, h["loss"]) for h in history if "loss" in h]
        valid = [(h["step"] + offset, h["eval_loss"]) for h in history if "eval_loss" in h]
        if train:
            loss_axis.plot(*zip(*train), label=f"{label} train")
        if valid:
            loss_axis.plot(*zip(*valid), marker="o", label=f"{label} valid")
        offset += max((h.get("step", 0) for h in history), default=0)
    loss_axis.set(title="Training loss", xlabel="optimizer step (stages one after another)", ylabel="loss")
    if loss_axis.get_legend_handles_labels()[0]:  # a run shorter than its logging interval logged no loss
        loss_axis.legend()
    for axis, draw in zip(metric_axes, panels):
        draw(axis)
    figure.tight_layout()

    fd, tmp = tempfile.mkstemp(prefix=".curves.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)


def grouped_bars(axis, labels: list[str], series: dict[str, list[float]]) -> None:
    """One group of bars per label, one bar per series in each group (e.g. the model and each baseline), with a
    legend."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        axis.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    axis.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    axis.legend()
