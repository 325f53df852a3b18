"""adamerging.png: AdaMerging's answer entropy and λ per step, and the final λ per layer (layer-wise)."""

from __future__ import annotations

from pathlib import Path


def draw_lambdas(path: Path, history: list[dict], layers: list[str], adapters: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [entry["step"] for entry in history]
    lambdas = np.array([entry["lambda"] for entry in history])  # steps × K (× layers)
    figure, axes = plt.subplots(1, 3 if lambdas.ndim == 3 else 2, figsize=(15 if lambdas.ndim == 3 else 10, 3.6))
    axes[0].plot(steps, [entry["entropy"] for entry in history])
    axes[0].set(title="answer entropy (unlabelled prompts)", xlabel="step")
    mean = lambdas if lambdas.ndim == 2 else lambdas.mean(-1)
    for k, name in enumerate(adapters):
        axes[1].plot(steps, mean[:, k], label=name)
    axes[1].set(title="λ" + (" (mean over layers)" if lambdas.ndim == 3 else ""), xlabel="step", ylim=(0, 1))
    axes[1].legend(fontsize="small")
    if lambdas.ndim == 3:
        for k, name in enumerate(adapters):
            axes[2].plot(range(len(layers)), lambdas[-1, k], marker=".", label=name)
        axes[2].set(title="final λ per LoRA layer", xlabel="layer (module order)", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=100)  # into the merged run's temporary folder, which becomes the run whole
    plt.close(figure)
