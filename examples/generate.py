"""Generation with compiled_attn's Llama-family model: continuous batching over a paged KV cache.

By default a tiny random-weight model (seconds on a CPU). ``--hf DIR`` loads a local
transformers Llama checkpoint instead (``save_pretrained`` output; nothing is downloaded).
Prompts are random token ids of different lengths. The batched run admits prompts as slots and
blocks free up; the script then re-runs each prompt alone and prints whether the greedy
tokens agree (``batched == one at a time: True``), and the throughput.

    python examples/generate.py [--model tiny|small|1b-shape] [--backend auto] [--device cpu]
                                [--compile] [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import random

import torch

from compiled_attn.models import LlamaConfig, LlamaForCausalLM, generate


def load_model(args: argparse.Namespace) -> LlamaForCausalLM:
    if args.hf:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
        return LlamaForCausalLM.from_hf(hf, backend=args.backend, device=args.device)
    config = LlamaConfig.preset(args.model)
    return LlamaForCausalLM.random(config, seed=0, backend=args.backend, device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset shape of the random-weight model")
    parser.add_argument("--hf", default=None, help="local transformers Llama checkpoint directory")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the step")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture the step per bucket, replay it")
    args = parser.parse_args()

    model = load_model(args)
    rng = random.Random(0)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(3, 40))]
               for _ in range(args.num_prompts)]

    # Two sequences at a time, 32 new tokens per step: later prompts join as earlier ones finish,
    # long prompts are prefilled in chunks, and the shuffled block pool makes block tables ragged.
    result = generate(model, prompts, args.max_new_tokens, max_num_seqs=2, max_batch_tokens=32, shuffle_seed=0,
                      compile=args.compile, cuda_graphs=args.cuda_graphs, progress=True)
    for i, (prompt, out) in enumerate(zip(prompts, result.tokens)):
        print(f"prompt {i} ({len(prompt):2d} tokens) -> {out[:10]} ...")
    print(result.stats.summary())

    alone = [model.generate([p], args.max_new_tokens, max_num_seqs=1)[0] for p in prompts]
    print(f"batched == one at a time: {alone == result.tokens}")


if __name__ == "__main__":
    main()
