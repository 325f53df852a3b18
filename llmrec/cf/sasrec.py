"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's item sequence, a classical ranking baseline.

**Model.** As in the paper: item embeddings (scaled by sqrt(d)) plus learned position embeddings, dropout,
`num_layers` pre-LayerNorm blocks of causal multi-head self-attention and a point-wise two-layer ReLU feed-forward
(residuals around both), a final LayerNorm; the score of item i after position t is <h_t, e_i> with the item
embeddings shared. Sequences are left-padded to `max_length` with index 0; padded keys are masked and padded
positions are zeroed after every block.

**Loss.** Softmax cross-entropy over the whole catalog at every position. The paper trains a binary loss with one
sampled negative; RecBole's SASRec (where the LLM-recommendation papers' SASRec numbers mostly come from) defaults
to the full cross-entropy, which makes a stronger baseline, and a baseline should be as strong as we can make it.

**Data.** Training sequences are each user's training-split items in time order (the last `max_length` + 1);
every position predicts the next item. After each epoch the valid split's targets are ranked over the catalog
(each from all earlier items, history excluded) and HR@10 and NDCG@10 are recorded; training stops after
`patience` epochs without a better NDCG@10 (finer than HR@10, which saturates on small catalogs) and the best
epoch's weights are kept. `test` and `ood_*` interactions are never used.
Deterministic under the seed (CPU; torch's RNG forked for initialisation, dropout and shuffling).

A history's scores read its last `max_length` items; items the catalog does not hold are skipped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmrec.errors import LLMRecError
from llmrec.eval.metrics import ranking_metrics
from llmrec.logs import get_logger

from .config import SASRecConfig
from .ranking import top_k

logger = get_logger(__name__)

MASKED = -1e9  # a finite mask value: a padded query sees only padded keys, and -inf would give it NaNs


class SASRecModule(nn.Module):
    def __init__(self, num_items: int, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.items = nn.Embedding(num_items + 1, config.dim, padding_idx=0)
        self.positions = nn.Embedding(config.max_length, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.dim, config.num_heads, config.dim, config.dropout, activation="relu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.items.weight, std=config.dim ** -0.5)
        # small, so a position that training never filled (histories longer than any training sequence) adds little
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """Hidden states (batch, length, dim) of left-padded item-index sequences (batch, length)."""
        batch, length = sequences.shape
        real = sequences != 0
        positions = torch.arange(self.config.max_length - length, self.config.max_length)
        hidden = self.items(sequences) * math.sqrt(self.config.dim) + self.positions(positions)
        hidden = self.dropout(hidden) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        blocked = causal.unsqueeze(0) | ~real.unsqueeze(1)  # (batch, query, key)
        mask = torch.zeros(blocked.shape).masked_fill(blocked, MASKED)
        mask = mask.repeat_interleave(self.config.num_heads, dim=0)
        for block in self.blocks:
            hidden = block(hidden, src_mask=mask) * real.unsqueeze(-1)
        return self.norm(hidden)

    def catalog_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item (index 1..N, so column j is item j + 1) for each hidden state."""
        return hidden @ self.items.weight[1:].T


@dataclass
class SASRecModel:
    """A trained SASRec: `item_ids[j]` is the item of embedding row j + 1."""

    module: SASRecModule
    item_ids: list[str]
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {item: k + 1 for k, item in enumerate(self.item_ids)}
        self.module.eval()

    def encode(self, histories: Sequence[Sequence[str]]) -> torch.Tensor:
        """Left-padded index sequences (n, max_length) of the histories' last max_length known items."""
        length = self.module.config.max_length
        rows = np.zeros((len(histories), length), dtype=np.int64)
        for row, items in enumerate(histories):
            known = [self._index[i] for i in items if i in self._index][-length:]
            if known:
                rows[row, length - len(known):] = known
        return torch.from_numpy(rows)

    @torch.no_grad()
    def scores(self, histories: Sequence[Sequence[str]], batch_size: int = 256) -> torch.Tensor:
        """Scores (n, catalog) of every item as the next one after each history."""
        out = []
        for start in range(0, len(histories), batch_size):
            hidden = self.module(self.encode(histories[start : start + batch_size]))
            out.append(self.module.catalog_logits(hidden[:, -1]))
        return torch.cat(out) if out else torch.zeros(0, len(self.item_ids))

    def rank(self, histories: Sequence[Sequence[str]], k: int, exclude: Sequence[Sequence[str]] | None = None
             ) -> list[list[str]]:
        """The top-k items after each history (`exclude[n]` never recommended for history n)."""
        return top_k(self.scores(histories), self.item_ids, exclude, k)


def train_sasrec(data, config: SASRecConfig, seed: int, *, progress: bool = True) -> SASRecModel:
    """Train SASRec on `data`'s train split, early-stopping on valid HR@10; deterministic under `seed`.

    Raises `LLMRecError` when the data is not split or no user has two training items.
    """
    started = time.perf_counter()
    frame = data.interactions_frame
    if "split" not in frame.columns:
        raise LLMRecError("the interactions have no 'split' column; load them with llmrec.data.load_data.", data.name)
    item_ids = list(dict.fromkeys([*data.catalog_frame["item_id"].tolist(), *frame["item_id"].tolist()]))
    index = {item: k + 1 for k, item in enumerate(item_ids)}
    train_rows, valid_histories, valid_targets = [], [], []
    for sequence in data.user_sequences().values():
        seen = [item for item, split in sequence if split == "train"]
        if len(seen) >= 2:
            train_rows.append([index[i] for i in seen[-(config.max_length + 1):]])
        for position, (item, split) in enumerate(sequence):
            if split == "valid" and position:
                valid_histories.append([earlier for earlier, _ in sequence[:position]])
                valid_targets.append(item)
    if not train_rows:
        raise LLMRecError("no user has two training interactions, so SASRec has nothing to learn from.", data.name)
    padded = np.zeros((len(train_rows), config.max_length + 1), dtype=np.int64)
    for row, items in enumerate(train_rows):
        padded[row, -len(items):] = items
    sequences = torch.from_numpy(padded)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = SASRecModule(len(item_ids), config)
        optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        history: list[dict] = []
        best, best_epoch, best_state, stale = -1.0, 0, None, 0
        bar = tqdm(range(1, config.epochs + 1), desc="Training SASRec", unit="epoch", disable=not progress)
        for epoch in bar:
            module.train()
            total, steps = 0.0, 0
            for batch in torch.randperm(len(sequences)).split(config.batch_size):
                inputs, targets = sequences[batch, :-1], sequences[batch, 1:]
                logits = module.catalog_logits(module(inputs))
                loss = F.cross_entropy(logits.reshape(-1, len(item_ids)), (targets - 1).reshape(-1), ignore_index=-1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
            record = {"epoch": epoch, "loss": total / steps, "valid_hr@10": None, "valid_ndcg@10": None}
            if valid_targets:
                ranked = SASRecModel(module, item_ids).rank(valid_histories, 10, valid_histories)
                record.update({f"valid_{key}": value for key, value in
                               ranking_metrics(ranked, valid_targets, [10]).items() if key in ("hr@10", "ndcg@10")})
            history.append(record)
            shown = "-" if record["valid_ndcg@10"] is None else f"{record['valid_ndcg@10']:.4f}"
            bar.set_postfix(loss=f"{record['loss']:.4f}", valid_ndcg10=shown)
            if record["valid_ndcg@10"] is None:
                best_epoch, best_state = epoch, None
            elif record["valid_ndcg@10"] > best:
                best, best_epoch, best_state, stale = record["valid_ndcg@10"], epoch, copy.deepcopy(
                    module.state_dict()), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
        bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    seconds = time.perf_counter() - started
    best_record = history[best_epoch - 1]
    info = {"seed": seed, "best_epoch": best_epoch, "best_valid_hr@10": best_record["valid_hr@10"],
            "best_valid_ndcg@10": best_record["valid_ndcg@10"],
            "epochs_run": len(history), "train_sequences": len(train_rows), "train_seconds": round(seconds, 3)}
    logger.info(f"SASRec trained in {seconds:.1f}s: best epoch {best_epoch} of {len(history)}"
                + (f", valid NDCG@10 {best:.4f}" if valid_targets else ""))
    return SASRecModel(module, item_ids, config.model_dump(), history, info)
