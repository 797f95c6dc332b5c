"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU: Triton's own ptxas
turns them into cubins, so a kernel that only breaks the compiled path fails here, not on the GPU.
They also compile for Ada (sm_89, the oldest with fp8 conversions) and Ampere (sm_80, bf16 only),
the other GPUs the backend accepts, within those GPUs' shared memory per block; those two have
never run on such a GPU here. Each variant is built as a launch would pick it
(compiled_attn/kernels/_aot.py)."""

from __future__ import annotations

import subprocess

import pytest

pytest.importorskip("triton", reason="the kernels are Triton kernels")
try:
    from compiled_attn.kernels import _aot
except ImportError:  # pragma: no cover - an older/newer Triton layout
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)


H100_SHARED = 227 * 1024  # opt-in shared memory per block
# Arch -> the opt-in shared memory per block (bytes) of the smallest GPU of that generation.
OTHER_TARGETS = {89: 99 * 1024, 80: 163 * 1024}
ALL_FEATURES = dict(USE_WINDOW=True, USE_ALIBI=True, USE_SOFTCAP=True)


def _compile(launch: _aot.Launch, arch: int = 90):
    return _built(lambda: launch.compile(arch))


def _built(build):
    try:
        compiled = build()
    except RuntimeError as err:
        if "ptxas" in str(err) and "not found" in str(err).lower():
            pytest.skip(f"no ptxas here: {err}")
        raise
    assert compiled.asm["cubin"], "no machine code"
    return compiled


@pytest.mark.parametrize("head_size", [80, 128, 192, 256])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shape", ["decode_split4", "prefill"])
def test_paged_attention_compiles_for_sm90(shape, fp8, head_size):
    launch = _aot.paged_attention_launch(decode=shape.startswith("decode"), fp8=fp8, head_size=head_size,
                                         features=ALL_FEATURES)
    compiled = _compile(launch)
    assert compiled.metadata.shared <= H100_SHARED, f"{compiled.metadata.shared} bytes of shared memory"


@pytest.mark.parametrize("int32_offsets", [True, False])
def test_prefill_tensor_core_pipeline_is_not_serialised(int32_offsets):
    """ptxas keeps the sm_90 prefill kernel's wgmma asynchronous: when code it cannot place within a
    wgmma pipeline stage appears anywhere in the kernel (a padding-token store before the key loops
    did), it serialises every wgmma of the function and each key loop runs 8-15% slower."""
    import tempfile

    compiled = _compile(_aot.paged_attention_launch(decode=False, int32_offsets=int32_offsets))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx, tempfile.TemporaryDirectory() as out:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([_aot.ptxas(90), "-v", "-arch=sm_90a", ptx.name, "-o", f"{out}/k.cubin"],
                                capture_output=True, text=True, check=True)
    assert "C7515" not in report.stdout + report.stderr, report.stdout + report.stderr


@pytest.mark.parametrize("head_size", [192, 256])
def test_large_head_prefill_keeps_its_accumulator_in_registers(head_size):
    """Prefill of 256-wide heads (192 padded) on sm_90 takes two warpgroups: on one, the 128x256
    fp32 accumulator spilled 1,240 bytes a thread and ran 5-6x slower (tune_h100.json)."""
    compiled = _compile(_aot.paged_attention_launch(decode=False, head_size=head_size))
    try:
        stats = _aot.sass_stats(compiled)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no cuobjdump here: {err}")
    assert stats["stack_bytes"] == 0, stats


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("splits,fused", [(1, False), (4, False), (4, True), (32, True)])
def test_store_and_decode_compiles_for_sm90(fp8, splits, fused):
    _compile(_aot.store_and_decode_launch(fp8=fp8, num_splits=splits, fused=fused, features=ALL_FEATURES))


@pytest.mark.parametrize("fp8", [False, True])
def test_caches_past_int32_offsets_compile_for_sm90(fp8):
    """Caches of 2**31 elements or more take 64-bit K/V offsets: both kernels build that way too."""
    for launch in (_aot.paged_attention_launch(decode=True, fp8=fp8, int32_offsets=False),
                   _aot.paged_attention_launch(decode=False, fp8=fp8, int32_offsets=False),
                   _aot.store_and_decode_launch(fp8=fp8, int32_offsets=False)):
        assert launch.constexprs["INT32_OFFSETS"] is False
        _compile(launch)


@pytest.mark.parametrize("arch", sorted(OTHER_TARGETS))
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shape", ["decode_split4", "prefill"])
def test_paged_attention_compiles_for_ampere_and_ada(shape, fp8, arch):
    if fp8 and arch < 89:
        pytest.skip("fp8 KV needs compute capability 8.9 (the backend refuses it below)")
    for head_size in (128, 192, 256):
        launch = _aot.paged_attention_launch(decode=shape.startswith("decode"), fp8=fp8, head_size=head_size,
                                             hopper=False, features=ALL_FEATURES)
        compiled = _compile(launch, arch)
        assert compiled.metadata.shared <= OTHER_TARGETS[arch], \
            f"sm_{arch}, head {head_size}: {compiled.metadata.shared} bytes of shared memory"


@pytest.mark.parametrize("fp8", [False, True])
def test_compiles_after_an_interpreted_launch(monkeypatch, fp8):
    """The CPU tests interpret kernels in the same process first: that leaves the kernels'
    modules holding interpreted twins and (Triton 3.9's interpreter) parts of triton.language
    patched, neither of which may reach a compiled build afterwards."""
    import torch

    from compiled_attn.kernels.store_and_decode import store_and_decode

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(0)
    q, out = torch.randn(1, 4, 64, generator=gen), torch.full((1, 4, 64), float("nan"))
    k, v = torch.randn(1, 2, 64, generator=gen), torch.randn(1, 2, 64, generator=gen)
    cache = torch.randn(2, 2, 16, 2, 64, generator=gen).to(torch.float8_e4m3fn if fp8 else torch.float32)
    one = torch.ones(())
    store_and_decode(q, k, v, cache, torch.tensor([5], dtype=torch.int32), torch.tensor([[1]], dtype=torch.int32),
                     torch.tensor([20], dtype=torch.int64), out, scale=0.125, k_scale=one, v_scale=one)
    assert torch.isfinite(out).all()
    monkeypatch.delenv("TRITON_INTERPRET")
    _compile(_aot.store_and_decode_launch(fp8=fp8, num_splits=2))


@pytest.mark.parametrize("head_size,block_size,dtype,fuse_store",
                         [(128, 16, "bfloat16", False), (64, 256, "float16", False), (256, 16, "bfloat16", False),
                          (112, 32, "float16", False), (192, 64, "bfloat16", False), (128, 16, "bfloat16", True),
                          (64, 256, "float16", True), (80, 16, "bfloat16", True)])
def test_gluon_prefill_compiles_for_sm90(head_size, block_size, dtype, fuse_store):
    """The Hopper Gluon prefill kernel builds with this Triton (its Gluon API moves between releases)
    within an H100's shared memory, each consumer still issuing Q·K^T and P·V together (a wait that
    leaves one wgmma group in flight); also the build that stores the step's K/V (``fuse_store``)."""
    import torch

    from compiled_attn.kernels import gluon_prefill

    if gluon_prefill.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API (the Triton kernel serves every step)")
    compiled = _built(lambda: _aot.compile_gluon_prefill(head_size=head_size, block_size=block_size,
                                                         dtype=getattr(torch, dtype), fuse_store=fuse_store))
    assert compiled.metadata.shared <= H100_SHARED, f"{compiled.metadata.shared} bytes of shared memory"
    assert "wgmma.wait_group.sync.aligned 1;" in compiled.asm["ptx"]
