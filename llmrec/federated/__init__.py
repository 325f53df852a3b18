"""Federated fine-tuning on Flower: aggregation rules of federated LoRA (`rules`), update checks
(`validation`), the client (`client`), the server strategy and round loop (`server`), Flower's apps (`app`) and
`llmrec federate` (`run`).

Only `config` and `rules` are imported here: Flower is an optional extra (`pip install llmrec[flower]`), needed
by the apps and the runner alone.
"""

from .config import FederatedConfig
from .rules import RULES, AggregationRule, build_rule

__all__ = ["RULES", "AggregationRule", "FederatedConfig", "build_rule"]
