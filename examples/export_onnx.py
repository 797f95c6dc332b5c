"""Export a model step to ONNX and generate with ONNX Runtime, feeding each step's cache back in.

A tiny random-weight Llama-family model (``compiled_attn.models``) is exported once, with a
dynamic token count, sequence count and block-table width, so one graph serves the prefill and
the decode steps. The graph takes the KV cache as an input and returns the new cache as an
output. ONNX Runtime runs a prefill of two prompts and then greedy decode steps, each step taking
the cache the previous one returned; PyTorch runs the same steps eagerly. Prints the largest
error of the logits and of the cache, and ``OK`` when the generated tokens agree.

    python examples/export_onnx.py [--output model.onnx] [--steps 8]

Needs the ``onnx`` extra (``pip install compiled-attn[onnx]``).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import onnxruntime as ort
import torch
from torch.export import Dim

from compiled_attn.export import metadata_dynamic_shapes, to_onnx
from compiled_attn.models import LlamaConfig, LlamaForCausalLM, SeqChunk, build_step_inputs

BLOCK_SIZE = 4
NUM_BLOCKS = 32


def step_args(inputs, cache: torch.Tensor) -> tuple:
    """``LlamaForCausalLM.forward``'s arguments: (input_ids, positions, kv_caches, meta, logits_index)."""
    return inputs.input_ids, inputs.positions, cache, inputs.meta, inputs.logits_index


def onnx_feed(session: ort.InferenceSession, args: tuple) -> dict[str, np.ndarray]:
    tensors = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    return {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="where to write the ONNX file (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prefill")
    args = parser.parse_args()

    model = LlamaForCausalLM.random(LlamaConfig.preset("tiny"), seed=0, backend="reference", device="cpu",
                                    dtype=torch.float32)
    cache = model.new_cache(NUM_BLOCKS, BLOCK_SIZE, shuffle_seed=0)
    prompts = [[11, 42, 7, 99, 3], [5, 250, 18]]
    blocks = [cache.allocator.allocate(cache.blocks_needed(len(p) + args.steps + 1)) for p in prompts]

    def inputs(chunks, num_tokens):
        return build_step_inputs(chunks, BLOCK_SIZE, num_tokens=num_tokens, num_seqs=len(chunks), num_blocks=NUM_BLOCKS)

    prefill = inputs([SeqChunk(p, 0, b) for p, b in zip(prompts, blocks)], num_tokens=8)

    # One graph for every step: tokens, sequences and block-table width are dynamic.
    tokens, seqs, width = Dim("num_tokens", min=2, max=4096), Dim("num_seqs", min=2, max=256), Dim("max_blocks")
    dynamic = ({0: tokens}, {0: tokens}, None, metadata_dynamic_shapes(tokens, seqs, width), {0: seqs})
    path = args.output or os.path.join(tempfile.mkdtemp(), "tiny_llama.onnx")
    onnx_model = to_onnx(model, step_args(prefill, cache.kv.clone()), path, output_names=["logits"],
                         dynamic_shapes=dynamic)
    print(f"exported {path}: {len(onnx_model.graph.node)} nodes; inputs "
          f"{[i.name for i in onnx_model.graph.input]}; outputs {[o.name for o in onnx_model.graph.output]}")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    torch_cache, onnx_cache = cache.kv.clone(), cache.kv.numpy().copy()
    lengths = [0] * len(prompts)
    chunks = [SeqChunk(p, 0, b) for p, b in zip(prompts, blocks)]
    num_tokens = 8
    logits_error = cache_error = 0.0
    torch_tokens: list[list[int]] = [[] for _ in prompts]
    onnx_tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(args.steps + 1):
        step_inputs = inputs(chunks, num_tokens)
        with torch.no_grad():
            expected = model(*step_args(step_inputs, torch_cache)).numpy()
        logits, onnx_cache = session.run(None, onnx_feed(session, step_args(step_inputs, torch.from_numpy(onnx_cache))))
        logits_error = max(logits_error, float(np.abs(logits - expected).max()))
        cache_error = max(cache_error, float(np.abs(onnx_cache - torch_cache.numpy()).max()))
        for seq, (row_t, row_o) in enumerate(zip(expected.argmax(-1), logits.argmax(-1))):
            torch_tokens[seq].append(int(row_t))
            onnx_tokens[seq].append(int(row_o))
        # Next step: one new token per sequence (PyTorch's choice, so both sides see the same inputs).
        lengths = [n + len(c.tokens) for n, c in zip(lengths, chunks)]
        chunks = [SeqChunk([toks[-1]], n, b) for toks, n, b in zip(torch_tokens, lengths, blocks)]
        num_tokens = len(chunks)

    print(f"max |logits error| over {args.steps + 1} steps: {logits_error:.3g}")
    print(f"max |cache error|: {cache_error:.3g}")
    for seq, (t, o) in enumerate(zip(torch_tokens, onnx_tokens)):
        print(f"prompt {seq}: torch {t}\n          onnx  {o}")
    print("OK" if torch_tokens == onnx_tokens and logits_error < 1e-4 else "MISMATCH")


if __name__ == "__main__":
    main()
