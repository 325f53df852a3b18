"""EPT and LAMP runs on vLLM: their soft prompts reach the engine as `prompt_embeds`.

vLLM dropped prompt adapters, and a LoRA module cannot carry a prompt, so `llmrec serve` starts the engine with
`--enable-prompt-embeds` and the server's llmrec layer (the endpoint plugin of `llmrec.serve.recommend`) builds each
request's input embeddings the way the run's adapter does: `[P ; E(x)]`, P the run's final prompt (EPT's fused and
projected prompt, LAMP's low-rank prompt) and E(x) the base model's token embeddings, plus DePT's position offsets
for an EPT run with offsets. The embeddings are computed by the run's own adapter (`SoftPrompt`), so they are exact
also where the stock PEFT export is refused (EPT with offsets).

* `/v1/recommend` on an EPT or LAMP ranking run sends every beam step as such a request: exact, offsets included.
* `/v1/completions` with `"model": "<run>"`: the plugin replaces vLLM's route with one that rewrites such requests
  (the prompt tokenised by the run's tokenizer, then `[P ; E(x)]`) into a `prompt_embeds` request to the base model
  and hands them, like every other request, to vLLM's own handler. The tokens vLLM generates are embedded by the
  base model alone, which is the adapter's computation for a prompt-only method (LAMP, EPT without offsets); an EPT
  run with offsets adds an offset to generated tokens too, so its completions are refused (400, with the reason) and
  it is served for /v1/recommend only.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

from llmrec.errors import LLMRecError


class SoftPrompt:
    """`[P ; E(x)]` of a finished EPT or LAMP run, computed by the run's adapter (loaded once, on the CPU)."""

    def __init__(self, run_dir: str | Path):
        from llmrec.rundir import load_trained

        _, _, model, tokenizer, _ = load_trained(run_dir)
        self.model, self.tokenizer = model.eval().to("cpu"), tokenizer
        with torch.no_grad():
            self.prompt = model.prompt().float()
        self.offsets = getattr(model, "offset_A", None) is not None

    @torch.no_grad()
    def embeddings(self, token_ids: list[int]) -> torch.Tensor:
        """(num_virtual_tokens + len(token_ids), d) float32: what the adapter feeds the base model."""
        tokens = torch.tensor([token_ids])
        positions = torch.arange(len(token_ids))[None]
        self.model.check_positions(len(token_ids) - 1)
        inputs = self.model.embed(tokens, None, positions)[0].float()
        return torch.cat([self.prompt, inputs])

    def completion_request(self, request, base_name: str):
        """vLLM's `CompletionRequest` for the run, rewritten for the base model with `prompt_embeds`."""
        if self.offsets:
            raise LLMRecError("this EPT run adds DePT's position offsets to every token, generated ones included, and "
                              "vLLM embeds the tokens it generates itself; its completions would not be the run's. "
                              "Use /v1/recommend (exact), or train with adapter.args.offsets: false to serve "
                              "completions.", "model")
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        encoded = []
        for prompt in prompts:
            ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
            buffer = io.BytesIO()
            torch.save(self.embeddings(ids), buffer)
            encoded.append(base64.b64encode(buffer.getvalue()))
        return request.model_copy(update={"model": base_name, "prompt": None, "prompt_embeds": encoded})
