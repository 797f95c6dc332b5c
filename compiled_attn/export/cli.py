"""``compiled-attn export``: write a random-weight Llama-family model step as ONNX.

The step is exported at the shape of one example batch — a decode of ``--num-seqs`` sequences
or a prefill padded to ``--num-tokens`` — or, with ``--dynamic``, with the token count, sequence
count and block-table width left dynamic. ``--verify`` runs the graph once in ONNX Runtime and
prints its largest difference from PyTorch.
"""

from __future__ import annotations

import argparse
import os
import random

import torch

from .functional import TARGETS


def add_parser(subparsers) -> None:
    from ..models.config import PRESETS

    p = subparsers.add_parser("export", help="export a random-weight Llama-family model step to ONNX")
    p.add_argument("--output", "-o", default="model.onnx", help="ONNX file to write")
    p.add_argument("--target", choices=list(TARGETS), default="onnxruntime",
                   help="onnxruntime: standard ONNX ops; tensorrt: PagedAttention plugin nodes (compiled_attn.trt)")
    p.add_argument("--model", choices=list(PRESETS), default="tiny", help="model shape (random weights)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", choices=("decode", "prefill"), default="decode", help="shape of the example step")
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--num-tokens", type=int, default=None,
                   help="padded token count of a prefill step (default: 16 per sequence)")
    p.add_argument("--context", type=int, default=24, help="cached tokens per sequence before a decode step")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dynamic", action="store_true", help="dynamic token count, sequence count and table width")
    p.add_argument("--opset", type=int, default=None, help="default-domain opset (default: the exporter's)")
    p.add_argument("--verify", action="store_true", help="run once in ONNX Runtime and compare with PyTorch")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from torch.export import Dim

    from ..models import LlamaConfig, LlamaForCausalLM, SeqChunk, build_step_inputs
    from .functional import metadata_dynamic_shapes
    from .onnx import to_onnx

    from tqdm.auto import tqdm

    stages = tqdm(total=3 if args.verify else 2, desc="building the model", unit="stage", leave=False)
    overrides = {} if args.layers is None else {"num_layers": args.layers}
    config = LlamaConfig.preset(args.model, **overrides)
    # fp32 on the CPU: the exported graph's dtype is the example's; attention is lowered, so the backend is moot.
    model = LlamaForCausalLM.random(config, seed=args.seed, backend="reference", device="cpu", dtype=torch.float32)
    rng = random.Random(args.seed)
    bs = args.block_size
    if args.phase == "decode":
        lengths = [(args.context, 1)] * args.num_seqs
        num_tokens = args.num_seqs
    else:
        num_tokens = args.num_tokens or 16 * args.num_seqs
        if num_tokens < args.num_seqs:
            raise SystemExit(f"--num-tokens ({num_tokens}) must be at least --num-seqs ({args.num_seqs})")
        lengths = [(0, num_tokens // args.num_seqs)] * args.num_seqs  # the remainder is padding
    widest = max(-(-(c + n) // bs) for c, n in lengths)
    if args.dynamic:
        # torch.export specializes dimensions of size 0 or 1: the example must be wider than that.
        if args.num_seqs < 2:
            raise SystemExit("--dynamic needs an example of at least 2 sequences (--num-seqs 2)")
        widest = max(widest, 2)
    cache = model.new_cache(widest * args.num_seqs + 1, bs, shuffle_seed=args.seed)
    chunks = []
    for context, new in lengths:
        blocks = cache.allocator.allocate(widest)
        chunks.append(SeqChunk([rng.randrange(config.vocab_size) for _ in range(new)], context, blocks))
    step = build_step_inputs(chunks, bs, num_tokens=num_tokens, num_seqs=args.num_seqs, max_blocks=widest,
                             num_blocks=cache.num_blocks)
    cache.kv.normal_(generator=torch.Generator().manual_seed(args.seed))  # a "filled" cache for decode
    example = (step.input_ids, step.positions, cache.kv, step.meta, step.logits_index)
    dynamic = None
    if args.dynamic:
        tokens, seqs, width = Dim("num_tokens", min=2), Dim("num_seqs", min=2), Dim("max_blocks", min=2)
        dynamic = ({0: tokens}, {0: tokens}, None, metadata_dynamic_shapes(tokens, seqs, width), {0: seqs})
    stages.update()
    stages.set_description("exporting (torch.export, then ONNX)")
    onnx_model = to_onnx(model, example, args.output, target=args.target, opset=args.opset,
                         output_names=["logits"], dynamic_shapes=dynamic)
    stages.update()
    ops = sorted({f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in onnx_model.graph.node})
    stages.write(f"wrote {args.output}: {config.num_layers} layers, {args.phase} step of {num_tokens} tokens / "
                 f"{args.num_seqs} sequences{' (dynamic shapes)' if args.dynamic else ''}, target {args.target}")
    stages.write(f"inputs: {', '.join(i.name for i in onnx_model.graph.input)}")
    stages.write(f"outputs: {', '.join(o.name for o in onnx_model.graph.output)}")
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in onnx_model.opset_import)
    stages.write(f"{os.path.getsize(args.output) / 2**20:.1f} MiB, opsets: {opsets}")
    stages.write(f"{len(onnx_model.graph.node)} nodes; ops: {', '.join(ops)}")
    if args.verify:
        if args.target != "onnxruntime":
            stages.write("--verify runs ONNX Runtime, which has no PagedAttention plugin: skipped for target tensorrt")
            stages.close()
            return 0
        import onnxruntime as ort

        stages.set_description("verifying in ONNX Runtime")

        session = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"])
        tensors = [t for t in torch.utils._pytree.tree_leaves(example) if isinstance(t, torch.Tensor)]
        logits, new_cache = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors)})
        expected_cache = cache.kv.clone()
        with torch.no_grad():
            expected = model(step.input_ids, step.positions, expected_cache, step.meta, step.logits_index)
        stages.update()
        stages.write(f"onnxruntime vs torch: max |logits error| {abs(logits - expected.numpy()).max():.3g}, "
                     f"max |cache error| {abs(new_cache - expected_cache.numpy()).max():.3g}")
    stages.close()
    return 0
