"""`POST /v1/recommend` on the vLLM server `llmrec serve` starts: a thin layer over the engine that already serves
the runs' adapters.

Request: `{"model": "<run>", "user": "<id>", "k": 10}` or `{"model": "<run>", "history": [item ids or titles],
"k": 10}`. Answer: the `llmrec recommend --json` object (the user, their items, and the top k distinct catalog items
they have not seen, each with its log-probability), plus `"model"`. The ranking is the run's own: its prompt, its
catalog trie and `eval.beams`, searched by `llmrec.eval.vllm_ranking.CatalogBeamSearch` with every step's requests
sent concurrently to the running engine under the run's LoRA adapter (a CoRA run: the user's, `<run>@<user>`,
exported on first use). Nothing else holds weights: the layer tokenises and walks the trie.

Bad input, before any engine work: a body that is not JSON → 400; a body over 64 KiB → 413; a missing, extra or
badly typed field, a `k` outside 1..100, both or neither of user and history → 422 naming the field; items a
history names that the catalog lacks → 422 naming them; an unknown run or user → 404 with the runs or an example
of the users. A user whose adapter cannot be made or loaded gets vLLM's answer (404 or 400); the server stays up.

vLLM loads endpoint plugins only when `VLLM_PLUGINS` names them; `llmrec serve` sets it, and passes the runs in
`LLMREC_SERVE_RUNS`. Runs whose task does not rank items are not served here (404 says so). An EPT or LAMP run's
requests carry its soft prompt as `prompt_embeds` (`llmrec.serve.soft_prompt`), and for those runs the plugin also
takes over `/v1/completions` (every other request goes on to vLLM's handler unchanged).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmrec.errors import LLMRecError
from llmrec.logs import get_logger
from llmrec.serve.per_user import SEPARATOR

logger = get_logger(__name__)
# {"<served run name>": {"run": RUN_DIR, "tokenizer": FOLDER, "per_user": bool, "soft_prompt": bool}}
ENVIRONMENT = "LLMREC_SERVE_RUNS"
PLUGIN_NAME = "llmrec_recommend"
MAX_BODY_BYTES = 64 * 1024
MAX_K = 100
MAX_HISTORY = 1000


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200)
    user: str | None = Field(default=None, max_length=200)
    history: list[str] | None = Field(default=None, min_length=1, max_length=MAX_HISTORY)
    k: int = Field(default=10, ge=1, le=MAX_K)

    @model_validator(mode="after")
    def _one_user(self):
        if (self.user is None) == (self.history is None):
            raise ValueError("give either user (a user of the run) or history (item ids or titles), not both")
        return self


@dataclass
class ServedCatalog:
    """A served ranking run: its task, data, tokenizer and catalog trie, loaded once at start, and for an EPT or LAMP
    run the soft prompt its requests carry (`llmrec.serve.soft_prompt`)."""

    name: str
    task: object
    data: object
    tokenizer: object
    trie: object
    per_user: bool
    soft_prompt: object = None


def load_catalog(name: str, spec: dict, soft_prompt=None) -> ServedCatalog | None:
    """The run's catalog, or None when its task does not rank items."""
    from transformers import AutoTokenizer

    from llmrec.data import load_data
    from llmrec.eval.ranking import build_trie
    from llmrec.recipe import load_recipe
    from llmrec.rundir import RunDir
    from llmrec.tasks import task_of
    from llmrec.tasks.ranking import RankingTask

    run = RunDir(Path(spec["run"]))
    recipe = load_recipe(run.recipe_file, instantiate=False)
    task = task_of(recipe)
    if not isinstance(task, RankingTask):
        return None
    data = load_data(recipe.data, recipe.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    return ServedCatalog(name, task, data, tokenizer, build_trie(tokenizer, data, recipe.data.task),
                         bool(spec.get("per_user")), soft_prompt)


async def _unless_disconnected(request, work):
    """`work`'s result, or None when the client disconnects first: the search is then cancelled, and vLLM aborts its
    requests (vLLM's own routes do the same with `with_cancellation`, which reads the body itself)."""
    from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect

    task, watch = asyncio.create_task(work), asyncio.create_task(listen_for_disconnect(request))
    done, _ = await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watch.cancel()
        return task.result()
    task.cancel()
    return None


class Refusal(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _error_response(status: int, message: str, field: str | None):
    """An error in the shape of vLLM's own (`{"error": {message, type, param, code}}`)."""
    from fastapi.responses import JSONResponse

    error = {"message": message, "type": "invalid_request_error", "param": field, "code": status}
    return JSONResponse({"error": error}, status_code=status)


class RecommendPlugin:
    """vLLM's endpoint-plugin interface (`attach_router`, `init_state`) for /v1/recommend."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self):
        self.engine = None
        self.runs: dict[str, dict] = json.loads(os.environ.get(ENVIRONMENT) or "{}")
        self.catalogs: dict[str, ServedCatalog] = {}
        self.soft_prompts: dict = {}  # EPT/LAMP runs: name -> llmrec.serve.soft_prompt.SoftPrompt

    def attach_router(self, app) -> None:
        from fastapi import Request
        from fastapi.responses import JSONResponse

        async def recommend(request: Request) -> JSONResponse | None:
            try:
                body = await self._parse(request)
                answer = await _unless_disconnected(request,
                                                    self.recommend(body, request.app.state.openai_serving_models))
                return None if answer is None else JSONResponse(answer)
            except Refusal as refusal:
                return _error_response(refusal.status, refusal.message, refusal.field)

        recommend.__annotations__["request"] = Request  # FastAPI resolves string annotations in module globals
        app.add_api_route("/v1/recommend", recommend, methods=["POST"])
        if any(spec.get("soft_prompt") for spec in self.runs.values()):
            self._attach_completions(app)

    def _attach_completions(self, app) -> None:
        """Replace vLLM's /v1/completions route by one that rewrites requests naming an EPT or LAMP run into
        `prompt_embeds` requests to the base model, then hands every request to vLLM's own handler."""
        from fastapi import Request
        from vllm.entrypoints.openai.completion.api_router import create_completion
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        async def completions(request: CompletionRequest, raw_request: Request):
            soft_prompt = self.soft_prompts.get(request.model)
            if soft_prompt is not None:
                try:
                    base = raw_request.app.state.openai_serving_models.model_name()
                    request = await asyncio.to_thread(soft_prompt.completion_request, request, base)
                except LLMRecError as error:
                    return _error_response(400, error.message, error.place)
            return await create_completion(request, raw_request)

        completions.__annotations__.update(request=CompletionRequest, raw_request=Request)
        app.add_api_route("/v1/completions", completions, methods=["POST"])
        # first in line: vLLM's own route sits in an included router, which vLLM's route replacement does not reach,
        # and the first route that matches answers
        app.router.routes.insert(0, app.router.routes.pop())

    async def init_state(self, engine_client, state, args) -> None:
        from llmrec.serve.soft_prompt import SoftPrompt

        self.engine = engine_client
        for name, spec in self.runs.items():
            if spec.get("soft_prompt"):
                self.soft_prompts[name] = await asyncio.to_thread(SoftPrompt, spec["run"])
            catalog = await asyncio.to_thread(load_catalog, name, spec, self.soft_prompts.get(name))
            if catalog is not None:
                self.catalogs[name] = catalog
        logger.info(f"/v1/recommend serves {', '.join(self.catalogs) or 'no ranking run'}; prompt embeddings for "
                    f"{', '.join(self.soft_prompts) or 'no run'}.")

    async def _parse(self, request) -> RecommendRequest:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise Refusal(413, f"the request body is over {MAX_BODY_BYTES // 1024} KiB.")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise Refusal(413, f"the request body is over {MAX_BODY_BYTES // 1024} KiB.")
        try:
            payload = json.loads(raw)
        except ValueError as error:
            raise Refusal(400, f"the body is not JSON: {error}.") from None
        try:
            return RecommendRequest.model_validate(payload)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or None
            raise Refusal(422, f"{where + ': ' if where else ''}{first['msg']}.", where) from None

    async def recommend(self, body: RecommendRequest, models) -> dict:
        catalog = self.catalogs.get(body.model)
        if catalog is None:
            why = ("its task does not rank items" if body.model in self.runs
                   else f"it is not served here (runs: {', '.join(self.runs) or 'none'})")
            raise Refusal(404, f"no recommendations from {body.model!r}: {why}.", "model")
        query = self._query(catalog, body)
        lora = None
        if catalog.soft_prompt is None:
            lora = await models.resolve_lora(f"{body.model}{SEPARATOR}{body.user}" if catalog.per_user else body.model)
            if getattr(lora, "error", None) is not None:
                raise Refusal(lora.error.code, lora.error.message, "user" if catalog.per_user else "model")
        ranked = await self._search(catalog, query, lora)
        return {"model": body.model, **query.result(catalog.data.titles, ranked)}

    def _query(self, catalog: ServedCatalog, body: RecommendRequest):
        from llmrec.tasks.ranking import item_of

        if body.history is not None:
            if catalog.per_user:
                raise Refusal(422, f"{body.model!r} is a CoRA run, whose adapter depends on the user: give a user "
                              "of the run.", "history")
            resolved, unknown = [], []
            for item in body.history:
                try:
                    resolved.append(item_of(catalog.data, item))
                except LLMRecError:
                    unknown.append(item)
            if unknown:
                raise Refusal(422, f"history: {', '.join(map(repr, unknown[:20]))} "
                              f"{'is' if len(unknown) == 1 else 'are'} not in the catalog of {body.model!r} (item ids "
                              "or titles).", "history")
            body = body.model_copy(update={"history": resolved})  # ids, which the query keeps as they are
        try:
            return catalog.task.recommendation_query(catalog.tokenizer, catalog.data, body.k, body.user, body.history,
                                                     catalog.trie)
        except LLMRecError as error:
            message = error.message.replace("--history", "history")  # the CLI's words, not the API's
            raise Refusal(404 if body.user is not None else 422, message, "user" if body.user else "history") \
                from None

    async def _search(self, catalog: ServedCatalog, query, lora) -> list[tuple[str, float]]:
        from llmrec.eval.vllm_ranking import CatalogBeamSearch

        tokenizer = catalog.tokenizer
        search = CatalogBeamSearch(query.trie, tokenizer(query.prompt)["input_ids"], query.banned, query.beams,
                                   tokenizer.eos_token_id)
        while not search.done:
            requests = search.requests()
            scores = await asyncio.gather(*(self._score(request, lora, catalog.soft_prompt) for request in requests))
            search.advance(requests, scores)
        return search.ranked()

    async def _score(self, request, lora, soft_prompt) -> dict[int, float]:
        from vllm.inputs import EmbedsPrompt, TokensPrompt

        from llmrec.eval.vllm_ranking import scores_of, scoring_params

        if soft_prompt is None:
            prompt = TokensPrompt(prompt_token_ids=request.prompt)
        else:
            prompt = EmbedsPrompt(prompt_embeds=soft_prompt.embeddings(request.prompt))
        final = None
        async for output in self.engine.generate(prompt, scoring_params(request),
                                                 f"llmrec-recommend-{uuid.uuid4().hex}", lora_request=lora):
            final = output
        return scores_of(final)
