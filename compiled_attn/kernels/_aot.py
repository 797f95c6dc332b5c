"""Our kernels compiled for a GPU on a machine without one, and what the machine code says.

Triton ships ``ptxas``, ``cuobjdump`` and ``nvdisasm``, so a kernel can be built for sm_90 (or
sm_89, sm_80) on the CPU machine, specialised as the JIT would for real tensors, and its SASS
read: registers, stack (spills), shared memory, instructions per key loop and per source line.
The compile tests use it to catch kernels that only break the compiled path;
``scripts/kernel_asm.py`` uses it to screen a kernel variant before spending GPU time on it.
Timings still need the GPU: fewer instructions are not always faster (BENCHMARKS.md).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _jit
from . import paged_attention as pa
from . import store_and_decode as sd
from .store_kv import FP8_E4M3_MAX

FLOAT_ARGS = ("scale", "softcap")
INT64_PTRS = ("slot_ptr",)
INT32_PTRS = ("query_start_loc_ptr", "seq_lens_ptr", "block_table_ptr", "sem_ptr")
QUERY_PTRS = ("q_ptr", "k_ptr", "v_ptr", "out_ptr")


def target(arch: int = 90) -> GPUTarget:
    """A CUDA target of compute capability ``arch`` (90 = H100)."""
    return GPUTarget("cuda", arch, 32)


def signature(kernel, constexprs: dict, cache_type: str, query_type: str = "*bf16") -> dict[str, str]:
    """Argument types of one of our kernels (``cache_type``: ``"*bf16"`` or ``"*fp8e4nv"``)."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in INT64_PTRS:
            sig[name] = "*i64"
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name == "cache_ptr":
            sig[name] = cache_type
        elif name in QUERY_PTRS:
            sig[name] = query_type
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def jit_specialisation(kernel, constexprs: dict) -> tuple[dict, dict]:
    """What Triton's launcher specialises for real tensors: unit innermost strides become
    constants, and pointers and the other strides are known multiples of 16 (16-byte aligned
    rows, which is what lets the compiler vectorise and pipeline the K/V loads)."""
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = dict(constexprs, **{n: 1 for n in names if n.startswith("s_") and n.endswith("d")})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (n.endswith("_ptr") or (n.startswith("s_") and n != "s_bt"))}
    return constexprs, attrs


def compile_for(kernel, constexprs: dict, cache_type: str, *, num_warps: int, num_stages: int, arch: int = 90):
    """The kernel built for ``arch`` as the JIT would build it for a launch with these constexprs."""
    namespace = kernel.fn.__globals__
    _jit.refresh(namespace, interpret=False)  # an interpreted launch leaves the module's functions interpreted
    kernel = namespace[kernel.fn.__name__]
    constexprs, attrs = jit_specialisation(kernel, constexprs)
    constexprs["USE_GDC"] = pa.programmatic_launch_on(divmod(arch, 10))  # as a device of this arch would launch it
    source = ASTSource(fn=kernel, signature=signature(kernel, constexprs, cache_type), constexprs=constexprs,
                       attrs=attrs)
    return triton.compile(source, target=target(arch), options={"num_warps": num_warps, "num_stages": num_stages})


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel variant as a launch would pick it: the kernel, its constexprs and options."""

    kernel: object
    constexprs: dict
    cache_type: str
    num_warps: int
    num_stages: int

    def compile(self, arch: int = 90):
        return compile_for(self.kernel, self.constexprs, self.cache_type, num_warps=self.num_warps,
                           num_stages=self.num_stages, arch=arch)


def _constexprs(*, features: dict | None, **static) -> dict:
    """The launch plans' constexprs for these static shapes (``paged_attention.kernel_constexprs``,
    compiled-path choices: no fp32 dots; ``USE_GDC`` is set per arch by :func:`compile_for`);
    ``features`` sets USE_WINDOW / USE_ALIBI / USE_SOFTCAP. Module constants are read now, so a
    patched one (``scripts/kernel_asm.py --set``) counts."""
    return dict(pa.kernel_constexprs(dot_fp32=False, **static), **(features or {}))


def paged_attention_launch(*, decode: bool, fp8: bool = False, head_size: int = 128, hopper: bool = True,
                           num_splits: int | None = None, features: dict | None = None, group: int = 4,
                           heads: int = 32, block_size: int = 16, max_context: int = 4096,
                           int32_offsets: bool = True) -> Launch:
    """The unified kernel for a decode bucket (one query a sequence, ``num_splits`` splits,
    default 4) or a long prefill bucket, with the package's tile choices (``hopper``: sm_90;
    ``max_context``: what the block table addresses; ``int32_offsets``: the cache's size class)."""
    max_query_len = 1 if decode else 2048
    block_m, block_q, tile_n, warps, stages = pa.tile_config(
        num_queries_per_kv=group, head_size=head_size, max_query_len=max_query_len, interpret=False,
        fp8=fp8, hopper=hopper)
    splits = num_splits or (4 if decode else 1)
    tile_n = pa.short_split_tile_n(tile_n, max_context=max_context, num_splits=splits, max_query_len=max_query_len,
                                   fp8=fp8, block_size=block_size)
    constexprs = dict(
        _constexprs(features=features, group=group, num_heads=heads, head_size=head_size, block_size=block_size,
                    block_m=block_m, tile_n=tile_n, num_splits=splits,
                    fused_reduce=pa.fuse_split_merge(splits, block_m, "paged_attention"), max_context=max_context,
                    max_query_len=max_query_len, fp8=fp8, int32_offsets=int32_offsets),
        BLOCK_Q=block_q, LONGEST_FIRST=pa.LONGEST_FIRST, SHORT_MIN=0, SHORT_MAX=0)
    return Launch(pa._paged_attention_kernel, constexprs, "*fp8e4nv" if fp8 else "*bf16", warps, stages)


def store_and_decode_launch(*, fp8: bool = False, num_splits: int = 4, fused: bool | None = None,
                            head_size: int = 128, features: dict | None = None, group: int = 4, heads: int = 32,
                            block_size: int = 16, max_context: int = 4096, int32_offsets: bool = True) -> Launch:
    """The fused store + decode kernel split ``num_splits`` ways (``fused``: the in-kernel merge;
    default as the launch decides; ``int32_offsets``: the cache's size class)."""
    block_m, _, tile_n, warps, stages = pa.tile_config(
        num_queries_per_kv=group, head_size=head_size, max_query_len=1, interpret=False, fp8=fp8)
    tile_n = pa.short_split_tile_n(tile_n, max_context=max_context, num_splits=num_splits, max_query_len=1, fp8=fp8,
                                   block_size=block_size)
    if fused is None:
        fused = pa.fuse_split_merge(num_splits, block_m, "store_and_decode")
    constexprs = dict(
        _constexprs(features=features, group=group, num_heads=heads, head_size=head_size, block_size=block_size,
                    block_m=block_m, tile_n=tile_n, num_splits=num_splits, fused_reduce=fused,
                    max_context=max_context, max_query_len=1, fp8=fp8, kernel="store_and_decode",
                    int32_offsets=int32_offsets),
        FP8_MAX=FP8_E4M3_MAX, ROUND_FP8=False)
    return Launch(sd._store_and_decode_kernel, constexprs, "*fp8e4nv" if fp8 else "*bf16", warps, stages)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas(arch: int = 90) -> str:
    """The ptxas Triton itself assembles ``arch`` with (Triton 3.9 moved sm_90 to the newer of the
    two it ships, which reads the PTX version it emits)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        return _tool("ptxas")


def _run_on_cubin(compiled, *command: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([*command, f.name], capture_output=True, text=True, check=True).stdout


def sass(compiled) -> str:
    """The kernel's SASS with source-line comments (``nvdisasm -c -g``)."""
    return _run_on_cubin(compiled, _tool("nvdisasm"), "-c", "-g")


_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BACK_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")
_SOURCE_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def _opcode(instruction: str) -> str:
    words = instruction.split()
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def sass_stats(compiled, *, top: int = 5) -> dict:
    """Registers, stack bytes (spills), shared memory, instructions, and per key loop (a backward
    branch) its instructions, opcodes and source lines that account for most of them."""
    usage = _run_on_cubin(compiled, _tool("cuobjdump"), "-res-usage")
    resources = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", usage)}
    lines = sass(compiled).splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := _BACK_BRANCH.search(line)) and labels.get(m.group(1), i) < i - 1]
    source, instructions = None, []  # (line index, opcode, source line)
    for i, line in enumerate(lines):
        if m := _SOURCE_LINE.search(line):
            source = f"{os.path.basename(m.group(1))}:{m.group(2)}"
        elif m := _INSTRUCTION.match(line):
            instructions.append((i, _opcode(m.group(1)), source))
    loop_rows = []
    for start, end in loops:
        body = [(op, src) for i, op, src in instructions if start <= i <= end]
        loop_rows.append({
            "instructions": len(body),
            "opcodes": dict(collections.Counter(op for op, _ in body).most_common(top)),
            "source_lines": dict(collections.Counter(src for _, src in body).most_common(top)),
        })
    return {"registers": resources.get("reg"), "stack_bytes": resources.get("stack"),
            "shared_bytes": compiled.metadata.shared, "instructions": len(instructions), "loops": loop_rows}


def compile_gluon(kernel, args, constexprs: dict, *, divisible=(), arch: int = 90):
    """A Gluon kernel built for ``arch`` as a launch with these (real, CPU-resident) arguments would
    build it: argument types from the values (TMA descriptors, tensors, ints, floats), and the
    ``divisible`` arguments known multiples of 16, as the JIT finds aligned pointers and strides."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    constexprs = dict(constexprs)
    num_warps = constexprs.pop("num_warps", 4)
    names = kernel.arg_names
    signature = {name: "fp32" if isinstance(arg, float) else "i32" if isinstance(arg, int) else mangle_type(arg)
                 for name, arg in zip(names, args)}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = GluonASTSource(fn=kernel, signature=signature,
                            constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(source, target=target(arch), options={"num_warps": num_warps})


def compile_gluon_prefill(*, arch: int = 90, head_size: int = 128, block_size: int = 16, heads: int = 32,
                          kv_heads: int = 8, dtype=None, fuse_store: bool = False):
    """The Gluon prefill kernel (``gluon_prefill``) built for ``arch`` as a launch on tensors of these
    shapes would build it (``fuse_store``: the variant that stores the step's K/V too)."""
    import torch

    from . import gluon_prefill as gp

    dtype = dtype or torch.bfloat16
    q = torch.empty(256, heads, head_size, dtype=dtype)
    cache = torch.empty(2, 64, block_size, kv_heads, head_size, dtype=dtype)
    seq = torch.zeros(2, dtype=torch.int32)
    new = torch.empty(256, kv_heads, head_size, dtype=dtype)
    _, args, constexprs = gp.launch_args(q, cache, torch.zeros(3, dtype=torch.int32), seq,
                                         torch.zeros(2, 8, dtype=torch.int32), torch.empty_like(q), scale=0.1,
                                         **(dict(k=new, v=new) if fuse_store else {}))
    return compile_gluon(gp._prefill_kernel, args, constexprs, arch=arch, divisible=(
        "out_ptr", "query_start_loc_ptr", "seq_lens_ptr", "block_table_ptr", "s_ot", "s_oh"))
