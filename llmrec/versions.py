"""The versions of Python and of the libraries a run depends on, for model cards (runs and federated runs)."""

from __future__ import annotations

import importlib.metadata
import platform

LIBRARIES = ("llmrec", "torch", "transformers", "trl", "peft", "accelerate", "datasets")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
