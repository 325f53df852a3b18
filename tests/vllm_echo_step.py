"""One ECHO step with vLLM rollouts (TRL's colocate mode on vLLM's CPU build), then the weight sync; prints JSON.

Run by tests/test_vllm.py in a process of its own, because the colocated engine initialises torch.distributed for
the rest of its process: `python tests/vllm_echo_step.py FOLDER`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def prompt_logprobs(llm, tokens: list[int]) -> list[float]:
    """The engine's log-probability of each token after the first, given the ones before it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], tokens[1:])]


def model_logprobs(model, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), -1)
    return [logp[i, token].item() for i, token in enumerate(tokens[1:])]


def main(folder: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from llmrec.data.reasoning import ReasoningTaskConfig, reasoning_examples
    from llmrec.models.tiny import build_tiny_model, train_tokenizer
    from llmrec.trainers.echo import ECHOConfig, ECHOTrainer

    questions = reasoning_examples(ReasoningTaskConfig(train_size=0, valid_size=0, test_size=4), "test", 0)
    tokenizer = train_tokenizer(list(questions["prompt"]) * 5, 300, split_digits=True)
    # TRL's colocated engine loads the model from its folder; tiny:qwen2-s has heads vLLM's CPU attention computes
    build_tiny_model("tiny:qwen2-s", tokenizer, seed=0).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    args = ECHOConfig(output_dir=str(folder / "echo"), use_cpu=True, bf16=False, activation_checkpointing=False,
                      num_generations=4, num_votes=8, per_device_train_batch_size=8, max_completion_length=12,
                      learning_rate=1e-2, max_steps=1, logging_steps=1, report_to=[], seed=0, temperature=1.0,
                      use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256, vllm_chunk_tokens=4,
                      tree={"min_depth": 2, "entropy_high": 0.5, "entropy_low": 0.1, "branch_confidence": 9.0,
                            "entropy_jump": -10.0})
    dataset = Dataset.from_dict({"prompt": questions["prompt"], "answer": questions["answer"]})
    # the reward is the completion's length, so that a random model's group has a learning signal
    trainer = ECHOTrainer(model, reward_funcs=[lambda completions, **_: [float(len(c)) for c in completions]],
                          args=args, train_dataset=dataset, processing_class=tokenizer)
    llm = trainer.vllm_generation.llm
    requests = []
    generate = llm.generate
    llm.generate = lambda *a, **k: requests.append(len(a[0])) or generate(*a, **k)  # counts the rollout requests

    tokens = tokenizer(questions["prompt"][0])["input_ids"] + tokenizer("12 + 3")["input_ids"]
    before = prompt_logprobs(llm, tokens)
    initial = model_logprobs(trainer.model, tokens)
    requests.clear()
    trainer.train()
    rollout_requests = sum(requests)
    trainer.vllm_generation.sync_weights()  # TRL syncs before the next generation; the test does it at once
    print(json.dumps({"before": before, "initial": initial, "after": prompt_logprobs(llm, tokens),
                      "trained": model_logprobs(trainer.model, tokens), "rollout_requests": rollout_requests,
                      "engine_dtype": str(llm.llm_engine.model_config.dtype),
                      "forks": [e.get("rollout/forks_per_question") for e in trainer.state.log_history]}))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
