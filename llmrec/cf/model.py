"""`CFModel`: a trained CF model as two embedding tables, with id look-up, scoring and safetensors save/load."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmrec.errors import LLMRecError
from llmrec.files import read_json, write_json

from .ranking import top_k

WEIGHTS = "cf_model.safetensors"
META = "cf_model.json"
FORMAT_VERSION = 1


@dataclass
class CFModel:
    """A frozen CF model: `user_embeddings[k]` is the embedding of `user_ids[k]`, likewise for items.

    The tables are the final embeddings (for LightGCN the propagated layer mean), so scoring needs no graph:
    score(u, i) = <user_embeddings[u], item_embeddings[i]>.
    """

    user_ids: list[str]
    item_ids: list[str]
    user_embeddings: torch.Tensor
    item_embeddings: torch.Tensor
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.user_ids = [str(u) for u in self.user_ids]
        self.item_ids = [str(i) for i in self.item_ids]
        self.user_embeddings = self.user_embeddings.detach().to(torch.float32).cpu().contiguous()
        self.item_embeddings = self.item_embeddings.detach().to(torch.float32).cpu().contiguous()
        if self.user_embeddings.shape[0] != len(self.user_ids) or self.item_embeddings.shape[0] != len(self.item_ids):
            raise ValueError(
                f"embedding tables {tuple(self.user_embeddings.shape)} / {tuple(self.item_embeddings.shape)} do not "
                f"match {len(self.user_ids)} user ids / {len(self.item_ids)} item ids"
            )
        if self.user_embeddings.shape[1] != self.item_embeddings.shape[1]:
            raise ValueError("user and item embeddings differ in size")

    @property
    def dim(self) -> int:
        return int(self.user_embeddings.shape[1])

    @cached_property
    def _user_position(self) -> dict[str, int]:
        return {u: k for k, u in enumerate(self.user_ids)}

    @cached_property
    def _item_position(self) -> dict[str, int]:
        return {i: k for k, i in enumerate(self.item_ids)}

    def user_index(self, ids: str | Sequence[str]) -> torch.Tensor:
        """Row indices (int64) of user ids; raises `LLMRecError` naming the first unknown id."""
        return _index(self._user_position, ids, "user")

    def item_index(self, ids: str | Sequence[str]) -> torch.Tensor:
        """Row indices (int64) of item ids; raises `LLMRecError` naming the first unknown id."""
        return _index(self._item_position, ids, "item")

    def score(self, user_ids: str | Sequence[str], item_ids: str | Sequence[str]) -> torch.Tensor:
        """Dot products of (user, item) pairs, float32 of shape (n,).

        Both sides are equal-length sequences (pair k is user_ids[k], item_ids[k]), or one side is a single id
        that is paired with every id of the other side.
        """
        users, items = self.user_index(user_ids), self.item_index(item_ids)
        if users.ndim and items.ndim and users.numel() != items.numel():
            raise ValueError(f"score needs as many user ids as item ids ({users.numel()} vs {items.numel()})")
        return (self.user_embeddings[users] * self.item_embeddings[items]).sum(-1)

    def rank(self, user_ids: Sequence[str], k: int, exclude: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
        """The top-k catalog items of each user by score (`exclude[n]` never recommended to user n)."""
        scores = self.user_embeddings[self.user_index(list(user_ids))] @ self.item_embeddings.T
        return top_k(scores, self.item_ids, exclude, k)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `cf_model.safetensors` (the two tables) and `cf_model.json` (ids, config, history), atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file({"user_embeddings": self.user_embeddings, "item_embeddings": self.item_embeddings}, tmp)
            os.replace(tmp, folder / WEIGHTS)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        write_json(
            folder / META,
            {
                "format_version": FORMAT_VERSION,
                "dim": self.dim,
                "user_ids": self.user_ids,
                "item_ids": self.item_ids,
                "config": self.config,
                "history": self.history,
                "info": self.info,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CFModel:
        """Read a folder written by `save` (safetensors only)."""
        folder = Path(folder)
        missing = [name for name in (WEIGHTS, META) if not (folder / name).is_file()]
        if missing:
            raise LLMRecError(
                f"not a saved CF model: {' and '.join(missing)} not found. Train one with llmrec.cf.train_cf and "
                "save it with CFModel.save(folder).",
                str(folder),
            )
        meta = read_json(folder / META)
        tensors = load_file(folder / WEIGHTS)
        try:
            return cls(
                user_ids=meta["user_ids"],
                item_ids=meta["item_ids"],
                user_embeddings=tensors["user_embeddings"],
                item_embeddings=tensors["item_embeddings"],
                config=meta.get("config", {}),
                history=meta.get("history", []),
                info=meta.get("info", {}),
            )
        except (KeyError, ValueError) as error:
            raise LLMRecError(f"the saved CF model is inconsistent ({error}); save it again.", str(folder)) from None


def _index(position: dict[str, int], ids: str | Sequence[str], kind: str) -> torch.Tensor:
    single = isinstance(ids, str)
    out = []
    for key in [ids] if single else ids:
        k = position.get(str(key))
        if k is None:
            raise LLMRecError(
                f"unknown {kind} id {str(key)!r}: the CF model has no embedding for it "
                f"({len(position)} {kind}s known, e.g. {next(iter(position), '(none)')!r})."
            )
        out.append(k)
    index = torch.tensor(out, dtype=torch.long)
    return index[0] if single else index
