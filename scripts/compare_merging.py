"""Merging use cases over several seeds: experts on one tiny base, merged by each method.

    python scripts/compare_merging.py --seeds 0 1 2 --benchmarks BENCHMARKS.md
    python scripts/compare_merging.py --use-case multi-domain --seeds 0 1 2 --benchmarks BENCHMARKS.md
    python scripts/compare_merging.py --use-case federated --seeds 0 1 2 --benchmarks BENCHMARKS.md

multi-task (the default): for each seed `recipes/merging/ranking-tiny.yaml`, then `recipes/merging/ctr-tiny.yaml`
and the multi-task reference `recipes/merging/multitask-mtl-tiny.yaml` (one adapter on both datasets) on that run's
base, then `llmrec merge` of the two experts by every method in METHODS (each merged run is evaluated on both tasks).
The multi-task adapter is evaluated on the experts' endpoints as `llmrec merge MTL CTR RANKING --weights 1,0,0` (its
exact ΔW). The table gives each task's metric for the experts, the multi-task adapter and every method, the
normalised score (each task's merged metric over its expert's, above chance for AUC, averaged over the two tasks)
and the merge's wall time.

multi-domain: for each seed `recipes/merging/domains-base-tiny.yaml` (a short full fine-tuning on MovieLens-100K that
teaches the tiny model the titles), then on its final model one LoRA expert per group of users by dominant genre
(`recipes/merging/domain-{drama,comedy,action}-tiny.yaml`) and one adapter on all three groups
(`domain-all-tiny.yaml`, the multi-domain training reference), then `llmrec merge` of the three experts by every
method in DOMAIN_METHODS; every merged run is evaluated on each group's test users (its own data and catalog). The
reference rows are merges too, so that they are evaluated on exactly the same rows: the base alone is the three
experts at weight 0, and the all-groups adapter is `llmrec merge ALL DRAMA COMEDY ACTION --weights 1,0,0,0` (the
all-groups adapter's exact ΔW, evaluated on the three groups' endpoints). The normalised score is the mean over
groups of HR@10 / the group's expert's.

federated: for each seed the federated tiny base (`recipes/fedlora/pretrain-tiny.yaml`), then FedSA
(`recipes/fedlora/fedsa-tiny.yaml`: A shared, each client's B personal), then `llmrec merge` of the four clients'
personal adapters (`RUN#client=K`) by every static method in FEDERATED_METHODS, with no client data: AdaMerging is
left out because it reads the test prompts. Every merged run is evaluated on the pooled test rows of all clients, as
the federation's global adapter is; the personal adapters' row is each client's adapter on its own client's rows.

Results accumulate in <output>/results.json (mean ± std over seeds in the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compare_alignment import reproducing_command, write_benchmarks

RANKING, CTR, MTL = "merging-ranking-tiny", "merging-ctr-tiny", "merging-mtl-tiny"
MTL_LABEL = "multi-task training (one adapter, both datasets)"
ADAMERGING = ["--method", "adamerging", "--steps", "100", "--lr", "1e-2"]
METHODS = {  # the merged run's folder: (the table's row, `llmrec merge` options)
    "ta-1": ("task arithmetic (λ = 1)", ["--method", "task_arithmetic"]),
    "ta-0.5": ("task arithmetic (λ = 0.5)", ["--method", "task_arithmetic", "--weights", "0.5,0.5"]),
    "ties": ("TIES (d = 0.3)", ["--method", "ties", "--density", "0.3"]),
    "dare-ties": ("DARE-TIES (d = 0.3)", ["--method", "dare_ties", "--density", "0.3"]),
    "ada-task": ("AdaMerging, task-wise", ADAMERGING),
    "ada-layer": ("AdaMerging, layer-wise", [*ADAMERGING, "--granularity", "layer"]),
    "ada-layer-surgery": ("AdaMerging, layer-wise + Surgery", [*ADAMERGING, "--granularity", "layer",
                                                               "--surgery-steps", "200"]),
}
COLUMNS = [("HR@10 (ranking)", "test/hr@10"), ("NDCG@10 (ranking)", "test/ndcg@10"),
           ("AUC (like)", f"endpoint/{CTR}/test/auc"), ("UAUC (like)", f"endpoint/{CTR}/test/uauc")]

DOMAINS = ("drama", "comedy", "action")  # recipes/merging/domain-<name>-tiny.yaml; "action" holds action and thriller
DOMAIN_BASE = "merging-domains-base-tiny"
DOMAIN_METHODS = {
    "ta-1": ("task arithmetic (λ = 1)", ["--method", "task_arithmetic"]),
    "ta-third": ("task arithmetic (λ = 1/3)", ["--method", "task_arithmetic", "--weights", "0.333,0.333,0.333"]),
    "ties": ("TIES (d = 0.3)", ["--method", "ties", "--density", "0.3"]),
    "dare-ties": ("DARE-TIES (d = 0.3)", ["--method", "dare_ties", "--density", "0.3"]),
    "ada-layer": ("AdaMerging, layer-wise", [*ADAMERGING, "--granularity", "layer"]),
}
DOMAIN_COLUMNS = [(f"HR@10 ({d})", f"{d}/hr@10") for d in DOMAINS] + [(f"NDCG@10 ({d})", f"{d}/ndcg@10")
                                                                      for d in DOMAINS]


def _llmrec(args: list[str], log: Path) -> float:
    started = time.time()
    with open(log, "a") as handle:
        done = subprocess.run([sys.executable, "-m", "llmrec", *args], stdout=handle, stderr=handle)
    if done.returncode:
        raise SystemExit(f"llmrec {' '.join(args)} failed; see {log}")
    return time.time() - started


def _merged(out: Path, args: list[str], seed: int, log: Path) -> tuple[dict, float | None]:
    """`llmrec merge ARGS OUT` unless OUT has its metrics already; (its metrics, the merge's wall time or None)."""
    seconds = None
    if not (out / "metrics.json").is_file():
        seconds = _llmrec(["merge", *args, "--seed", str(seed), str(out)], log)
    return json.loads((out / "metrics.json").read_text()), seconds


def run_seed(seed: int, output: Path) -> dict:
    folder, log = output / f"s{seed}", output / "log.txt"
    common = [f"run.seed={seed}", f"run.output_dir={folder}"]
    if not (folder / RANKING / "metrics.json").is_file():
        _llmrec(["train", "recipes/merging/ranking-tiny.yaml", *common], log)
    if not (folder / CTR / "metrics.json").is_file():
        _llmrec(["train", "recipes/merging/ctr-tiny.yaml", *common, f"model.name={folder / RANKING / 'base'}"], log)
    if not (folder / MTL / "metrics.json").is_file():
        _llmrec(["train", "recipes/merging/multitask-mtl-tiny.yaml", *common,
                 f"model.name={folder / RANKING / 'base'}"], log)
    ranking = json.loads((folder / RANKING / "metrics.json").read_text())
    like = json.loads((folder / CTR / "metrics.json").read_text())
    rows = {"experts": {"test/hr@10": ranking["test/hr@10"], "test/ndcg@10": ranking["test/ndcg@10"],
                        f"endpoint/{CTR}/test/auc": like["test/auc"], f"endpoint/{CTR}/test/uauc": like["test/uauc"]}}
    # the multi-task adapter on the experts' endpoints: a merge that keeps its ΔW exactly and evaluates each task
    if not (folder / "mtl" / "metrics.json").is_file():
        _llmrec(["merge", str(folder / MTL), str(folder / CTR), str(folder / RANKING), "--method", "task_arithmetic",
                 "--weights", "1,0,0", str(folder / "mtl")], log)
    mtl = json.loads((folder / "mtl" / "metrics.json").read_text())
    rows[MTL_LABEL] = {key: mtl[key if key.startswith("endpoint/") else f"endpoint/{RANKING}/{key}"]
                       for _, key in COLUMNS}
    for key, (label, args) in METHODS.items():
        metrics, seconds = _merged(folder / key, [str(folder / RANKING), str(folder / CTR), *args], seed, log)
        rows[label] = {key: metrics.get(key) for _, key in COLUMNS} | ({"seconds": seconds} if seconds else {})
        print(f"seed {seed} {label}: " + ", ".join(f"{k} {rows[label][k]:.4f}" for _, k in COLUMNS), flush=True)
    return rows


def _stat(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def _table(results: dict, labels: list[str], columns: list[tuple[str, str]], normalise=None) -> str:
    """Mean ± std over seeds of each row's `columns`, the `normalise(seed_rows, label)` score (None: skip that seed)
    when given, and the mean merge time."""
    lines = ["| system | " + " | ".join(c for c, _ in columns) + (" | normalised" if normalise else "")
             + " | merge time (s) |", "|---" + "|---:" * (len(columns) + (2 if normalise else 1)) + "|"]
    for label in labels:
        cells = [_stat([seed[label][key] for seed in results.values() if label in seed]) for _, key in columns]
        if normalise:
            scores = [normalise(seed, label) for seed in results.values() if label in seed]
            cells.append(_stat([score for score in scores if score is not None]))
        seconds = [seed[label]["seconds"] for seed in results.values() if seed.get(label, {}).get("seconds")]
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + (f"{statistics.mean(seconds):.0f}" if seconds else "–") + " |")
    return "\n".join(lines)


def table(results: dict) -> str:
    def normalise(seed: dict, label: str) -> float:
        return statistics.mean([seed[label]["test/hr@10"] / seed["experts"]["test/hr@10"],
                                (seed[label][COLUMNS[2][1]] - 0.5) / (seed["experts"][COLUMNS[2][1]] - 0.5)])

    labels = ["experts", MTL_LABEL, *(label for label, _ in METHODS.values())]
    return _table(results, labels, COLUMNS, normalise) + (
        f"\n\nSeeds: {', '.join(results)}. The experts' row: each task's own expert; normalised: the mean of HR@10 / "
        "the expert's and (AUC − 0.5) / (the expert's − 0.5), so 1 keeps both experts and 0 is chance on like "
        "prediction and no ranking.")


def _domain(name: str) -> str:
    return f"merging-domain-{name}-tiny"


def _per_domain(metrics: dict, first: str) -> dict:
    """{"<domain>/hr@10": ...} of a merged run whose first input is `first` (its own metrics are that input's data;
    the other inputs' are under endpoint/<run>/)."""
    return {f"{d}/{m}": metrics[f"test/{m}" if _domain(d) == first else f"endpoint/{_domain(d)}/test/{m}"]
            for d in DOMAINS for m in ("hr@10", "ndcg@10")}


def run_domains_seed(seed: int, output: Path) -> dict:
    folder, log = output / f"domains-s{seed}", output / "log.txt"
    common = [f"run.seed={seed}", f"run.output_dir={folder}"]
    if not (folder / DOMAIN_BASE / "metrics.json").is_file():
        _llmrec(["train", "recipes/merging/domains-base-tiny.yaml", *common], log)
    for name in (*DOMAINS, "all"):
        if not (folder / _domain(name) / "metrics.json").is_file():
            _llmrec(["train", f"recipes/merging/domain-{name}-tiny.yaml", *common,
                     f"model.name={folder / DOMAIN_BASE / 'final'}"], log)
    experts = [str(folder / _domain(d)) for d in DOMAINS]
    rows = {"experts": {}, "popularity": {}}
    for d in DOMAINS:
        own = json.loads((folder / _domain(d) / "metrics.json").read_text())
        rows["experts"] |= {f"{d}/hr@10": own["test/hr@10"], f"{d}/ndcg@10": own["test/ndcg@10"]}
        rows["popularity"] |= {f"{d}/{m}": own[f"baseline/popularity/test/{m}"] for m in ("hr@10", "ndcg@10")}
    references = {  # merges that reproduce one model exactly, evaluated on the three groups
        "base": ("base model, no adapter", [*experts, "--method", "task_arithmetic", "--weights", "0,0,0"],
                 _domain(DOMAINS[0])),
        "all-groups": ("one adapter trained on all groups", [str(folder / _domain("all")), *experts, "--method",
                                                              "task_arithmetic", "--weights", "1,0,0,0"],
                       _domain("all")),
    }
    merges = {key: (label, [*experts, *args], _domain(DOMAINS[0])) for key, (label, args) in DOMAIN_METHODS.items()}
    for key, (label, args, first) in {**references, **merges}.items():
        metrics, seconds = _merged(folder / key, args, seed, log)
        rows[label] = _per_domain(metrics, first)
        if seconds and key in merges:
            rows[label]["seconds"] = seconds
        print(f"seed {seed} {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[label].items()), flush=True)
    return rows


def domains_table(results: dict) -> str:
    def normalise(seed: dict, label: str) -> float | None:
        if not all(seed["experts"][f"{d}/hr@10"] for d in DOMAINS):
            return None
        return statistics.mean(seed[label][f"{d}/hr@10"] / seed["experts"][f"{d}/hr@10"] for d in DOMAINS)

    return _table(results, list(next(iter(results.values()))), DOMAIN_COLUMNS, normalise) + (
        f"\n\nSeeds: {', '.join(results)}. Each group's test users (200 seeded, all 136 for comedy), the whole "
        "catalog of that group's films ranked; the experts' row: each group's own expert; popularity: the group's "
        "most interacted films; normalised: the mean over groups of HR@10 / the group expert's.")


FEDSA, FED_BASE = "fedsa-tiny", "fedlora-pretrain-tiny"
FEDERATED_METHODS = {
    "ta-quarter": ("task arithmetic (λ = 1/4, the clients' mean)", ["--method", "task_arithmetic", "--weights",
                                                                    "0.25,0.25,0.25,0.25"]),
    "ta-1": ("task arithmetic (λ = 1)", ["--method", "task_arithmetic"]),
    "ties": ("TIES (d = 0.5)", ["--method", "ties", "--density", "0.5"]),
    "dare-ties": ("DARE-TIES (d = 0.5)", ["--method", "dare_ties", "--density", "0.5"]),
}
FEDERATED_COLUMNS = [("exact match", "exact_match"), ("ROUGE-L", "rouge_l"), ("loss", "loss")]


def run_federated_seed(seed: int, output: Path) -> dict:
    folder, log = output / f"federated-s{seed}", output / "log.txt"
    common = [f"run.seed={seed}", f"run.output_dir={folder}"]
    if not (folder / FED_BASE / "metrics.json").is_file():
        _llmrec(["train", "recipes/fedlora/pretrain-tiny.yaml", *common], log)
    if not (folder / FEDSA / "metrics.json").is_file():
        _llmrec(["federate", "recipes/fedlora/fedsa-tiny.yaml", *common, f"model.name={folder / FED_BASE / 'final'}"],
                log)
    federated = json.loads((folder / FEDSA / "metrics.json").read_text())
    rows = {label: {key: federated[f"{prefix}_{key}"] for _, key in FEDERATED_COLUMNS}
            for label, prefix in (("FedSA global adapter (shared A, B at 0: the base model)", "test/global"),
                                  ("each client's personal adapter, on its own rows", "test/local"))}
    clients = [f"{folder / FEDSA}#client={k}" for k in range(federated["federated/clients"])]
    for key, (label, args) in FEDERATED_METHODS.items():
        metrics, seconds = _merged(folder / key, [*clients, *args], seed, log)
        rows[label] = {k: metrics[f"test/{k}"] for _, k in FEDERATED_COLUMNS} | ({"seconds": seconds} if seconds
                                                                                  else {})
        print(f"seed {seed} {label}: " + ", ".join(f"{k} {rows[label][k]:.4f}" for _, k in FEDERATED_COLUMNS),
              flush=True)
    return rows


def federated_table(results: dict) -> str:
    return _table(results, list(next(iter(results.values()))), FEDERATED_COLUMNS) + (
        f"\n\nSeeds: {', '.join(results)}. FedSA, 4 clients, 3 rounds; every row but the personal adapters' is "
        "scored on the pooled test rows of all clients (240); merges use no client data.")


USE_CASES = {  # name: (one seed's rows, the table, BENCHMARKS title, default output)
    "multi-task": (run_seed, table, "Merging: ranking and like-prediction experts on one tiny base",
                   "runs/compare-merging"),
    "multi-domain": (run_domains_seed, domains_table,
                     "Merging: per-genre-group experts on MovieLens-100K, one tiny base",
                     "runs/compare-merging-domains"),
    "federated": (run_federated_seed, federated_table, "Merging: a federated run's personal adapters into one",
                  "runs/compare-merging-federated"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--use-case", choices=USE_CASES, default="multi-task")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path)
    parser.add_argument("--benchmarks", type=Path)
    args = parser.parse_args()
    run_one, make_table, title, default_output = USE_CASES[args.use_case]
    output = args.output or Path(default_output)
    output.mkdir(parents=True, exist_ok=True)
    store = output / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for seed in args.seeds:
        earlier = results.get(str(seed), {})  # keeps the merge times of runs that are only reloaded now
        fresh = run_one(seed, output)
        results[str(seed)] = {label: {**earlier.get(label, {}), **row} for label, row in fresh.items()}
        store.write_text(json.dumps(results, indent=1))
    body = make_table({str(s): results[str(s)] for s in args.seeds})
    print(body)
    if args.benchmarks:
        write_benchmarks(args.benchmarks, title, reproducing_command("compare_merging.py"), body,
                         tag="compare_merging")


if __name__ == "__main__":
    main()
