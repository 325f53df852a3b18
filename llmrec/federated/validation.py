"""Checks on a client's update before the server averages it in.

An update is rejected (and logged with the client and the reason, never aggregated) when it lacks an expected
tensor or carries an unexpected one, when a shape or dtype differs from what the rule expects, when a value is
not finite, or when the L2 norm of its change from the tensors the client started from exceeds `max_norm`
(a bound on how far one round of local training can move the adapter; poisoned or diverged updates exceed it).
"""

from __future__ import annotations

import math

import torch


def update_problems(update: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                    reference: dict[str, torch.Tensor], max_norm: float | None) -> list[str]:
    """Why `update` must be rejected (empty: accept it). `expected` gives the names, shapes and dtypes;
    `reference` the tensors the client started from (same names)."""
    problems = []
    missing = sorted(set(expected) - set(update))
    unexpected = sorted(set(update) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    squared = 0.0
    for name in sorted(set(update) & set(expected)):
        tensor, want = update[name], expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}")
            continue
        if tensor.dtype != want.dtype:
            problems.append(f"{name} has dtype {tensor.dtype}, expected {want.dtype}")
            continue
        if not torch.isfinite(tensor).all():
            problems.append(f"{name} holds non-finite values (NaN or inf)")
            continue
        squared += float((tensor.double() - reference[name].double()).pow(2).sum())
    if max_norm is not None and not problems and math.sqrt(squared) > max_norm:
        problems.append(f"the update's norm {math.sqrt(squared):.3g} exceeds the bound {max_norm:g}")
    return problems
