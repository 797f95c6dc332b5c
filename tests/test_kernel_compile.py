"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU: Triton's own ptxas
turns them into cubins, so a kernel that only breaks the compiled path fails here, not on the GPU.
They also compile for Ada (sm_89, the oldest with fp8 conversions) and Ampere (sm_80, bf16 only),
the other GPUs the backend accepts, within those GPUs' shared memory per block; those two have
never run on such a GPU here."""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton", reason="the kernels are Triton kernels")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - an older/newer Triton layout
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)

from compiled_attn.kernels import paged_attention as pa  # noqa: E402
from compiled_attn.kernels import store_and_decode as sd  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED = 227 * 1024  # opt-in shared memory per block
# Arch -> the opt-in shared memory per block (bytes) of the smallest GPU of that generation.
OTHER_TARGETS = {89: 99 * 1024, 80: 163 * 1024}
FLOAT_ARGS = ("scale", "softcap")
INT64_PTRS = ("slot_ptr",)
INT32_PTRS = ("query_start_loc_ptr", "seq_lens_ptr", "block_table_ptr", "sem_ptr")


def _signature(kernel, constexprs: dict, kv: str) -> dict[str, str]:
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
            sig[name] = kv
        elif name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
            sig[name] = "*bf16"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _jit_specialisation(kernel, constexprs: dict) -> tuple[dict, dict]:
    """What Triton's launcher would specialise for real tensors: unit innermost strides become
    constants, and pointers and the other strides are known multiples of 16 (16-byte aligned
    rows, which is what lets the compiler vectorise and pipeline the K/V loads)."""
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = dict(constexprs, **{n: 1 for n in names if n.startswith("s_") and n.endswith("d")})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (n.endswith("_ptr") or (n.startswith("s_") and n != "s_bt"))}
    return constexprs, attrs


def _compile(kernel, constexprs: dict, kv: str, num_warps: int = 4, num_stages: int = 2, target=H100):
    constexprs, attrs = _jit_specialisation(kernel, constexprs)
    source = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, kv), constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    except RuntimeError as err:
        if "ptxas" in str(err) and "not found" in str(err).lower():
            pytest.skip(f"no ptxas here: {err}")
        raise
    assert compiled.asm["cubin"], "no machine code"
    return compiled


FEATURES = dict(USE_WINDOW=True, USE_ALIBI=True, USE_SOFTCAP=True, DOT_FP32=False, FP8_DOT_FP16=True)


@pytest.mark.parametrize("head_size", [80, 128, 256])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shape", ["decode_split4", "prefill"])
def test_paged_attention_compiles_for_sm90(shape, fp8, head_size):
    decode = shape.startswith("decode")
    block_m, block_q, tile_n, warps, stages = pa.tile_config(
        num_queries_per_kv=4, head_size=head_size, max_query_len=1 if decode else 2048, interpret=False, fp8=fp8,
        hopper=True)
    constexprs = dict(FEATURES, G=4, NUM_HEADS=32, HEAD=head_size, HEAD_PAD=triton.next_power_of_2(head_size),
                      BLOCK_SIZE=16, BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
                      NUM_SPLITS=4 if decode else 1, FUSED_REDUCE=decode, IS_FP8=fp8,
                      MERGE_CHUNK=pa.merge_chunk(4, block_m), LONGEST_FIRST=True)
    compiled = _compile(pa._paged_attention_kernel, constexprs, "*fp8e4nv" if fp8 else "*bf16", warps, stages)
    assert compiled.metadata.shared <= H100_SHARED, f"{compiled.metadata.shared} bytes of shared memory"


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("splits,fused", [(1, False), (4, False), (4, True), (32, True)])
def test_store_and_decode_compiles_for_sm90(fp8, splits, fused):
    block_m, _, tile_n, warps, stages = pa.tile_config(
        num_queries_per_kv=4, head_size=128, max_query_len=1, interpret=False, fp8=fp8)
    constexprs = dict(FEATURES, G=4, NUM_HEADS=32, HEAD=128, HEAD_PAD=128, BLOCK_SIZE=16, BLOCK_M=block_m,
                      TILE_N=tile_n, NUM_SPLITS=splits, FUSED_REDUCE=fused, IS_FP8=fp8, FP8_MAX=448.0,
                      ROUND_FP8=False, MERGE_CHUNK=pa.merge_chunk(splits, block_m))
    _compile(sd._store_and_decode_kernel, constexprs, "*fp8e4nv" if fp8 else "*bf16", warps, stages)


@pytest.mark.parametrize("arch", sorted(OTHER_TARGETS))
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shape", ["decode_split4", "prefill"])
def test_paged_attention_compiles_for_ampere_and_ada(shape, fp8, arch):
    if fp8 and arch < 89:
        pytest.skip("fp8 KV needs compute capability 8.9 (the backend refuses it below)")
    decode = shape.startswith("decode")
    for head_size in (128, 256):
        block_m, block_q, tile_n, warps, stages = pa.tile_config(
            num_queries_per_kv=4, head_size=head_size, max_query_len=1 if decode else 2048, interpret=False,
            fp8=fp8, hopper=False)
        constexprs = dict(FEATURES, G=4, NUM_HEADS=32, HEAD=head_size, HEAD_PAD=head_size, BLOCK_SIZE=16,
                          BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n, NUM_SPLITS=4 if decode else 1,
                          FUSED_REDUCE=decode, IS_FP8=fp8, MERGE_CHUNK=pa.merge_chunk(4, block_m),
                          LONGEST_FIRST=True)
        compiled = _compile(pa._paged_attention_kernel, constexprs, "*fp8e4nv" if fp8 else "*bf16", warps, stages,
                            target=GPUTarget("cuda", arch, 32))
        assert compiled.metadata.shared <= OTHER_TARGETS[arch], \
            f"sm_{arch}, head {head_size}: {compiled.metadata.shared} bytes of shared memory"
