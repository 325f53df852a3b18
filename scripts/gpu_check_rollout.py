"""GPU check of the rollout backends: vLLM and transformers on the same prompts, flat and tree, tokens/s and decoded
tokens per question. Run it whenever a GPU machine is available (a few minutes on one GPU):

    python scripts/gpu_check_rollout.py --model Qwen/Qwen2.5-0.5B-Instruct --questions 16 --leaves 8

--model may be a local folder (the machine may have no network). With --tiny the transformers backend runs on a
random tiny model only (vLLM needs a real checkpoint), which checks the script itself on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch


def report(name: str, out, seconds: float) -> None:
    decoded = sum(q.stats.decoded_tokens for q in out)
    leaves = sum(len(q.completions) for q in out)
    print(f"{name:<22} {seconds:8.2f} s  {decoded / len(out):9.1f} decoded tokens/question  "
          f"{decoded / seconds:10.1f} tokens/s  {leaves // len(out)} leaves/question  "
          f"forks/q {sum(q.stats.forks for q in out) / len(out):.1f}  "
          f"pruned/q {sum(q.stats.pruned for q in out) / len(out):.1f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--tiny", action="store_true", help="transformers only, on a random tiny model")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--leaves", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--chunk-tokens", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    args = parser.parse_args()

    from llmrec.data.reasoning import ReasoningTaskConfig, reasoning_examples
    from llmrec.rollout import HFRollout, SamplingConfig, TreeConfig, VLLMRollout

    questions = reasoning_examples(ReasoningTaskConfig(train_size=0, valid_size=0, test_size=args.questions,
                                                       levels=[3, 4]), "test", 0)["prompt"]
    if args.tiny:
        from llmrec.models.tiny import build_tiny_model, train_tokenizer

        tokenizer = train_tokenizer(list(questions) * 5, 400, split_digits=True)
        model = build_tiny_model("tiny:qwen2-s", tokenizer, seed=0).eval()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to("cuda").eval()
        questions = [
            tokenizer.apply_chat_template([{"role": "user", "content": q + " Put the final answer after ####."}],
                                          tokenize=False, add_generation_prompt=True)
            for q in questions
        ]
    prompts = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions]
    eos = [tokenizer.eos_token_id]
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=args.max_new_tokens)
    # fork where a real model hesitates; these suit instruction-tuned 0.5B-8B models on short arithmetic
    tree = TreeConfig(min_depth=8, max_depth=2, entropy_high=1.5, entropy_low=0.3, branch_confidence=6.0,
                      entropy_jump=0.3, prune_confidence=2.0, tail_confidence=2.5)
    flat = TreeConfig(branching=False, pruning=False)
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; {len(prompts)} questions, "
          f"{args.leaves} leaves each, max {args.max_new_tokens} new tokens")

    hf = HFRollout(model, eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    hf.generate(prompts[:2], 2, flat, sampling, seed=0)  # warm-up
    for name, config in (("transformers flat", flat), ("transformers tree", tree)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = hf.generate(prompts, args.leaves, config, sampling, seed=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        report(name, out, time.perf_counter() - start)
    if args.tiny:
        return

    del model
    torch.cuda.empty_cache()
    from vllm import LLM

    llm = LLM(model=args.model, gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=True,
              logprobs_mode="processed_logprobs", max_model_len=2048, seed=0)
    vllm = VLLMRollout(llm, eos, chunk_tokens=args.chunk_tokens)
    vllm.generate(prompts[:2], 2, flat, sampling, seed=0)  # warm-up (compilation, CUDA graphs)
    for name, config in (("vllm flat", flat), ("vllm tree", tree)):
        start = time.perf_counter()
        out = vllm.generate(prompts, args.leaves, config, sampling, seed=0)
        report(name, out, time.perf_counter() - start)
    text = tokenizer.decode(out[0].completions[0].token_ids, skip_special_tokens=True)
    print(f"a vLLM tree leaf: {text[:300]!r}")


if __name__ == "__main__":
    main()
