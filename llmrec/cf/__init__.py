"""Collaborative-filtering models: user and item embeddings learned from interactions alone.

Methods that inject collaborative knowledge into an LLM (CoRA and the like) need a frozen CF model that maps a
user and an item to vectors whose dot product predicts preference. This package trains one; it also trains the
classical rankers the LLM rankers are compared with (BPR-MF, which is `mf` below, and SASRec in `llmrec.cf.sasrec`).

**Models.** `mf` is matrix factorisation: one free embedding per user and per item, score(u, i) = <e_u, e_i>.
`lightgcn` (He et al., 2020) keeps the same free tables as layer 0 and propagates them over the user–item
bipartite graph of the training positives, normalised symmetrically (D^-1/2 A D^-1/2, no self-loops, no
feature transforms or non-linearities); the final embedding is the mean of layers 0..num_layers. The graph
is a torch sparse tensor and is propagated at every step, so gradients flow through it.

**Loss.** BPR (Rendle et al., 2009): for each training positive (u, i), one negative j drawn uniformly from the
items that u does not have as a training positive (collisions are redrawn), and the loss
-log sigmoid(score(u, i) - score(u, j)), plus `weight_decay` times half the squared L2 norm of the batch's layer-0
embeddings divided by the batch size (the BPR/LightGCN regulariser, rather than decay of every row each step).
Optimiser: Adam. With `positives: liked` (the default) the positives are training interactions rated at least
`like_threshold`, so disliked items can serve as negatives and the score learns "would like", which is what a
CTR-style task asks; with `positives: all` every training interaction is a positive (implicit feedback). For
LightGCN the graph's edges are the same positives.

**Validation and early stopping.** After each epoch the validation AUC is measured on the `valid` split: with
`positives: liked` and ratings, the AUC of the score against the like label (rating >= like_threshold) over the
valid interactions; otherwise each valid interaction against one item the user never interacted with (drawn
once, with the seed). The UAUC (per-user AUC, averaged) is recorded alongside. Training stops after `patience`
epochs without a better AUC, and the model keeps the best epoch's embeddings. When the valid split cannot give an
AUC (empty, or one class only) every epoch is trained, the last one is kept, and a warning says so. `ood_*` and
`test` interactions are never used.

**Ids.** The model holds every user of the interactions (any split) and every catalog item, so scoring never
fails for a known id. Users and items without training positives keep their random initialisation (normal,
std 0.1; for LightGCN an isolated node's final embedding is its initial one divided by num_layers + 1): their
scores are noise around zero (`info` counts the users and items that have training positives).

**Output.** A `CFModel` is just two float32 tables (the final embeddings, so LightGCN needs no graph at use),
the id lists, the config, the per-epoch history and a few facts (`info`). `save` writes `cf_model.safetensors`
and `cf_model.json` atomically; `CFModel.load` reads them back. Training is deterministic under the seed
(numpy Generator for sampling, torch Generator for initialisation, CPU-only).
"""

from __future__ import annotations

from .config import CFConfig, SASRecConfig
from .model import CFModel
from .sasrec import SASRecModel, train_sasrec
from .train import train_cf

__all__ = ["CFConfig", "CFModel", "SASRecConfig", "SASRecModel", "train_cf", "train_sasrec"]
