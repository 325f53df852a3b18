"""curves.png: training (and validation) loss per stage, and the ranking (CTR, classification, reasoning) metrics against the
baselines."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def draw_curves(path: Path, histories: dict[str, list[dict]], metrics: dict) -> None:
    order = ("test", "ood_popularity", "ood_temporal", "ood_environment", "valid")
    splits = [split for split in order
              if any(k.startswith((f"{split}/hr@", f"{split}/auc")) or k in (f"{split}/accuracy", f"{split}/exact_match")
                     for k in metrics)]
    figure, axes = plt.subplots(1, 1 + len(splits), figsize=(6 * (1 + len(splits)), 4.5), squeeze=False)
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
    if histories:
        loss_axis.legend()
    for axis, split in zip(metric_axes, splits):
        if f"{split}/auc" in metrics:
            bars = _ctr_bars
        elif f"{split}/accuracy" in metrics:
            bars = _accuracy_bars
        elif f"{split}/mean_accuracy" in metrics:
            bars = _reasoning_bars
        elif f"{split}/no_summary" in metrics:
            bars = _summary_bars
        elif f"{split}/exact_match" in metrics:
            bars = _instruction_bars
        else:
            bars = _ranking_bars
        bars(axis, metrics, split)
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


def _systems(metrics: dict, split: str, metric: str) -> dict[str, str]:
    """{system: metric-key prefix}: the model and every baseline that reports `metric` on `split`."""
    systems = {"model": f"{split}/"}
    for key in metrics:
        parts = key.split("/")
        in_split = len(parts) == 3 if split == "test" else (len(parts) == 4 and parts[2] == split)
        if parts[0] == "baseline" and parts[-1].startswith(metric) and in_split:
            systems[parts[1]] = "/".join(parts[:-1]) + "/"
    return systems


def _ctr_bars(axis, metrics: dict, split: str) -> None:
    systems = _systems(metrics, split, "auc")
    labels = ["AUC", "UAUC"]
    width = 0.8 / len(systems)
    for i, (name, prefix) in enumerate(systems.items()):
        values = [metrics.get(f"{prefix}{m.lower()}", 0.0) for m in labels]
        axis.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(labels))], labels)
    axis.set(title=f"Like prediction ({split})", ylabel="score", ylim=(0, 1))
    axis.legend()


def _accuracy_bars(axis, metrics: dict, split: str) -> None:
    systems = _systems(metrics, split, "accuracy")
    axis.bar(list(systems), [metrics.get(f"{prefix}accuracy", 0.0) for prefix in systems.values()])
    axis.set(title=f"Classification ({split})", ylabel="accuracy", ylim=(0, 1))


def _reasoning_bars(axis, metrics: dict, split: str) -> None:
    n = metrics.get(f"{split}/samples", "n")
    names = {"mean_accuracy": f"mean@{n}", "majority_accuracy": f"maj@{n}", "pass_accuracy": f"pass@{n}"}
    axis.bar(list(names.values()), [metrics.get(f"{split}/{key}", 0.0) for key in names])
    axis.set(title=f"Reasoning accuracy ({split})", ylabel="accuracy", ylim=(0, 1))


def _instruction_bars(axis, metrics: dict, split: str) -> None:
    categories = sorted(k.rsplit("/", 1)[1] for k in metrics if k.startswith(f"{split}/exact_match/"))
    names = ["all", *categories]
    axis.bar(names, [metrics[f"{split}/exact_match"], *(metrics[f"{split}/exact_match/{c}"] for c in categories)])
    axis.tick_params(axis="x", labelrotation=60)
    axis.set(title=f"Instruction exact match ({split})", ylabel="exact match", ylim=(0, 1))


def _summary_bars(axis, metrics: dict, split: str) -> None:
    populations = [p for p in (split, "ood") if f"{p}/model" in metrics]
    kinds = [k for k in ("no_summary", "model", "streaming", "oracle") if f"{split}/{k}" in metrics]
    width = 0.8 / len(populations)
    for i, population in enumerate(populations):
        axis.bar([x + i * width for x in range(len(kinds))], [metrics.get(f"{population}/{k}", 0.0) for k in kinds],
                 width, label=population)
    axis.set_xticks([x + width * (len(populations) - 1) / 2 for x in range(len(kinds))], kinds)
    axis.set(title="Judge accuracy given the summary", ylabel="accuracy", ylim=(0, 1))
    axis.legend()


def _ranking_bars(axis, metrics: dict, split: str) -> None:
    ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith(f"{split}/hr@"))
    systems = _systems(metrics, split, "hr@")
    labels = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")]
    width = 0.8 / max(1, len(systems))
    for i, (name, prefix) in enumerate(systems.items()):
        values = [metrics.get(f"{prefix}{m.lower()}@{k}", 0.0) for k in ks for m in ("HR", "NDCG")]
        axis.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    axis.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(labels))], labels)
    axis.set(title=f"Whole-catalog ranking ({split})", ylabel="score")
    axis.legend()
