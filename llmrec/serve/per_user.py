"""CoRA's per-user adapters on vLLM: materialised on a user's first request, then served like any LoRA module.

A CoRA run's weights depend on the user, so `llmrec serve` cannot name its adapters on vLLM's command line. It
enables vLLM's runtime LoRA loading instead (VLLM_ALLOW_RUNTIME_LORA_UPDATING) and passes the CoRA runs in
LLMREC_SERVE_PER_USER. A request for `"model": "<run>@<user>"` that vLLM does not know yet goes to its LoRA
resolvers; `PerUserResolver` (registered by `register`, a `vllm.general_plugins` entry point of llmrec's package)
exports that user's adapter (`llmrec export RUN OUT --user U`: W0 + lora_B · lora_A is exactly CoRA's weight for
the user) into `<LLMREC_CACHE>/serve/users/`, and vLLM loads it and keeps it among its cached adapters.

Only users the run's CF model knows are served: an id is matched against the run's `cf_model.json` before it
touches the file system, so no request can name a path, and unknown users (or runs) are vLLM's 404. A user whose
export fails is logged and also answered 404; the server keeps running.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

from llmrec.files import read_json
from llmrec.logs import get_logger

logger = get_logger(__name__)
ENVIRONMENT = "LLMREC_SERVE_PER_USER"  # {"<served run name>": {"run": RUN_DIR, "cache": FOLDER}}
SEPARATOR = "@"


def user_folder(cache: str | Path, user: str) -> Path:
    """Where a user's adapter is exported: the id's digest names the folder, so no id can name a path."""
    return Path(cache) / f"user-{hashlib.sha256(user.encode()).hexdigest()[:24]}"


class PerUserResolver:
    """vLLM's `LoRAResolver` interface (`resolve_lora`) for the per-user adapters of CoRA runs."""

    def __init__(self, runs: dict[str, dict[str, str]]):
        self.runs = runs
        self.users = {name: set(read_json(Path(spec["run"]) / "final" / "cf_model.json")["user_ids"])
                      for name, spec in runs.items()}

    def folder(self, lora_name: str) -> Path | None:
        """The adapter folder of a `<run>@<user>` name, or None when the run or the user is unknown."""
        run, _, user = lora_name.partition(SEPARATOR)  # run names have no "@" (module_name)
        if run not in self.runs or user not in self.users[run]:
            return None
        return user_folder(self.runs[run]["cache"], user)

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        from llmrec.publish.export import export_peft_lora

        folder = self.folder(lora_name)
        if folder is None:
            return None
        if not (folder / "adapter_config.json").is_file():
            run, _, user = lora_name.partition(SEPARATOR)  # run names have no "@" (module_name)
            try:
                await asyncio.to_thread(export_peft_lora, self.runs[run]["run"], folder, user=user)
            except Exception as err:  # a user whose adapter cannot be made is a 404, not a server error
                logger.warning(f"could not export the adapter of {lora_name!r}: {err}")
                return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))  # vLLM sets the id


def register() -> None:
    """vLLM's plugin hook: register the resolver when `llmrec serve` passed CoRA runs (a no-op otherwise)."""
    runs = os.environ.get(ENVIRONMENT)
    if not runs:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver("llmrec per-user CoRA adapters", PerUserResolver(json.loads(runs)))
