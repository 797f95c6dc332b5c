"""``compiled-attn`` (or ``python -m compiled_attn``): the command line.

Each subcommand is registered by an ``add_parser(subparsers)`` function that adds its parser and
sets ``func`` (``func(args) -> int`` exit status). The built-in ones are below; commands living
in their own modules are listed by module name in ``COMMAND_MODULES``: adding one is one line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import random
import sys
from collections.abc import Sequence

import torch

COMMAND_MODULES: tuple[str, ...] = ("compiled_attn.bench", "compiled_attn.bench_model", "compiled_attn.export.cli")
"""Modules whose ``add_parser(subparsers)`` registers a further subcommand."""

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:  # bf16 where it is fast, fp32 on the CPU
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------- info

def add_info_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, devices, and which attention backends can run here")
    p.add_argument("--device", default=None, help="device to ask about (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="query dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--block-size", type=int, default=16)
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from . import AttentionSpec, __version__, available_backends, select_backend

    device = args.device or _default_device()
    dtype = _dtype(args.dtype, device)
    print(f"compiled_attn {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"triton {_version('triton')}  transformers {_version('transformers')}")
    print(f"cpu: {platform.machine()}, {torch.get_num_threads()} threads")
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {props.name}, compute capability {props.major}.{props.minor}, "
              f"{props.total_memory / 2**30:.0f} GiB")
    if not torch.cuda.is_available():
        print("cuda: not available")

    # A typical layer (Llama-3-8B's attention shape) asks about the machine, not about odd features.
    spec = AttentionSpec(num_heads=32, num_kv_heads=8, head_size=128)
    try:
        selected = select_backend(spec, device=device, dtype=dtype, block_size=args.block_size).name
    except ValueError as e:
        selected, note = None, str(e)
    else:
        note = None
    print(f"\nbackends for {spec.num_heads} heads / {spec.num_kv_heads} kv heads / head size {spec.head_size}, "
          f"{str(dtype).removeprefix('torch.')} on {device}, block size {args.block_size}:")
    rows = available_backends(spec, device=device, dtype=dtype, block_size=args.block_size)
    width = max(len(n) for n in rows)
    for name, status in rows.items():
        mark = "selected" if name == selected else status
        print(f"  {name:<{width}}  {mark}")
    if note:
        print(f"no backend selected: {note}")
    print(f"  prefill kernel of triton/trtllm: {_prefill_kernel(spec, device, dtype, args.block_size)}")
    return 0


def _prefill_kernel(spec, device: str, dtype: torch.dtype, block_size: int) -> str:
    """Which kernel the ``triton``/``trtllm`` backends' prefill steps of this layer take here."""
    try:
        from .kernels import gluon_prefill, paged_attention
    except ImportError as e:
        return f"none ({e})"
    q = torch.empty(1, spec.num_heads, spec.head_size, device=device, dtype=dtype)
    cache = torch.empty(2, 1, block_size, spec.num_kv_heads, spec.head_size, device=device, dtype=dtype)
    longest_decode, short = paged_attention.SPLIT_MAX_QUERY_LEN, gluon_prefill.SHORT_QUERY_LEN
    reason = gluon_prefill.unsupported_reason(
        q, cache, q, sliding_window=None, logits_soft_cap=None, alibi_slopes=None, num_splits=None,
        max_query_len=max(longest_decode, short) + 1, split_max_query_len=longest_decode)
    if reason is not None:
        return f"Triton (Gluon: {reason})"
    return "Gluon (sm_90, gluon_prefill)" + (f"; sequences of up to {short} new tokens: Triton" if short else "")


# ---------------------------------------------------------------- generate

def add_generate_parser(subparsers) -> None:
    from .models.config import PRESETS

    p = subparsers.add_parser("generate", help="continuous-batching generation with a random-weight Llama-family model")
    p.add_argument("--model", choices=list(PRESETS), default="tiny", help="model shape (random weights)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--backend", default="auto", help="attention backend name, or auto")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--min-prompt-len", type=int, default=4)
    p.add_argument("--max-prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=4, help="sequences running at once")
    p.add_argument("--max-batch-tokens", type=int, default=128, help="new tokens per step (longer prompts are chunked)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None,
                   help="cache size (default: enough for max-num-seqs requests)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling")
    p.add_argument("--compile", action="store_true", help="run the step under torch.compile(fullgraph=True)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the step per bucket as CUDA graphs and replay it (default: on for cuda)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--show", type=int, default=3, help="print this many prompts' outputs")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .models import LlamaConfig, LlamaForCausalLM, generate

    device = args.device or _default_device()
    dtype = _dtype(args.dtype, device)
    overrides = {} if args.layers is None else {"num_layers": args.layers}
    config = LlamaConfig.preset(args.model, **overrides)
    model = LlamaForCausalLM.random(config, seed=args.seed, backend=args.backend, device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads / "
          f"{config.num_kv_heads} kv heads, {params / 1e6:.1f} M parameters, {str(dtype).removeprefix('torch.')} "
          f"on {device}, attention backend {model.backend_name}")
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(rng.randint(args.min_prompt_len, args.max_prompt_len))]
               for _ in range(args.num_prompts)]
    result = generate(model, prompts, args.max_new_tokens, num_blocks=args.num_blocks, block_size=args.block_size,
                      max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                      progress=not args.no_progress, compile=args.compile,
                      cuda_graphs=args.cuda_graphs)
    for i, (prompt, out) in enumerate(zip(prompts[: args.show], result.tokens)):
        print(f"prompt {i} ({len(prompt)} tokens) -> {out[:12]}{' ...' if len(out) > 12 else ''}")
    print(result.stats.summary())
    return 0


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compiled-attn", description="Paged attention for LLM inference.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_info_parser(subparsers)
    add_generate_parser(subparsers)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
