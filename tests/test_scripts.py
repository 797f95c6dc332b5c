"""The GPU-only tuning and profiling scripts stay in step with the package: every sweep names
bench cases and kernel constants that exist (a renamed constant would otherwise be set on the
module and silently change nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the sweeps patch the Triton kernels' constants")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import kernel_asm  # noqa: E402
import profile_case  # noqa: E402
import runner_host_ab  # noqa: E402
import tune_kernels  # noqa: E402

from compiled_attn import AttentionMetadata  # noqa: E402
from compiled_attn.kernels import paged_attention as pa  # noqa: E402


@pytest.mark.parametrize("name", sorted(tune_kernels.SWEEPS))
def test_sweeps_name_real_cases_and_constants(name):
    cases = tune_kernels.all_cases()
    for case, kv, backend, sweep in tune_kernels.SWEEPS[name]:
        assert case in cases and kv in ("bf16", "fp8") and backend in ("triton", "trtllm")
        configs = tune_kernels.configurations(sweep)
        assert configs, f"{name}/{case}: no configuration"
        for config in configs:
            for constant in config:
                assert hasattr(pa, constant), f"{name}/{case}: paged_attention has no {constant}"


def test_configurations_expand_products_and_keep_lists():
    assert tune_kernels.configurations({"A": (1, 2), "B": (3,)}) == [{"A": 1, "B": 3}, {"A": 2, "B": 3}]
    assert tune_kernels.configurations([{}, {"A": 1}]) == [{}, {"A": 1}]


def test_each_configuration_starts_from_the_defaults(monkeypatch):
    monkeypatch.setattr(pa, "DECODE_NUM_STAGES", pa.DECODE_NUM_STAGES)  # restored after the test
    monkeypatch.setattr(pa, "DECODE_TILE_N_GPU", pa.DECODE_TILE_N_GPU)
    defaults = {"DECODE_NUM_STAGES": 4, "DECODE_TILE_N_GPU": 64}
    tune_kernels.apply({"DECODE_NUM_STAGES": 2, "DECODE_TILE_N_GPU": 32}, defaults)
    tune_kernels.apply({"DECODE_NUM_STAGES": 3}, defaults)
    assert (pa.DECODE_NUM_STAGES, pa.DECODE_TILE_N_GPU) == (3, 64), "the earlier tile size was carried over"


def test_profile_summary_takes_medians_per_kernel():
    rows = [{"name": "attn", "us": 10.0, "gap_us": None}, {"name": "reduce", "us": 2.0, "gap_us": 0.5},
            {"name": "attn", "us": 12.0, "gap_us": 0.4}, {"name": "reduce", "us": 3.0, "gap_us": 0.3}]
    summary = {r["name"]: r for r in profile_case.summarise(rows)}
    assert summary["attn"]["count"] == 2 and summary["attn"]["median_us"] == 11.0
    assert summary["attn"]["median_gap_us"] == 0.4 and summary["reduce"]["median_gap_us"] == 0.4


def test_kernel_asm_reports_a_patched_decode_kernel(monkeypatch, capsys):
    """The SASS screen builds the variant a patched constant selects and finds its key loops."""
    from compiled_attn.kernels import _aot

    if not all(os.path.exists(_aot._tool(name)) for name in ("ptxas", "nvdisasm", "cuobjdump")):
        pytest.skip("this Triton ships no CUDA binary tools")
    monkeypatch.setattr(pa, "DECODE_TILE_N_GPU", pa.DECODE_TILE_N_GPU)  # restored after the test
    report = kernel_asm.main(["decode", "--splits", "4", "--set", "DECODE_TILE_N_GPU=32"])
    assert report["TILE_N"] == 32 and report["NUM_SPLITS"] == 4 and report["DECODE_TILE_N_GPU"] == 32
    assert 0 < report["registers"] <= 255 and report["instructions"] > 0
    assert report["loops"] and all(loop["instructions"] > 0 for loop in report["loops"])
    assert any("HMMA" in loop["opcodes"] for loop in report["loops"]), "the key loop's dots are tensor-core ops"
    assert '"registers"' in capsys.readouterr().out


PROBE_CHECK = """
import sys, torch
sys.path.insert(0, "scripts")
import dense_prefill_probe as probe
torch.manual_seed(0)
for kv_heads in (4, 2, 1):  # one head a program, and GQA tiles of 2 and 4 query heads
    q, out = torch.randn(2, 64, 4, 32), torch.empty(2, 64, 4, 32)
    k, v = torch.randn(2, 64, kv_heads, 32), torch.randn(2, 64, kv_heads, 32)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    for variant in probe.VARIANTS:
        small = dict(variant, block_m=variant["block_m"] // 8, block_n=variant["block_n"] // 4, ws=False)
        out.fill_(float("nan"))
        probe.dense_attention(q, k, v, out, **small)()
        err = (out - ref).abs().max().item()
        assert err < 3e-2, (kv_heads, small, err)  # the kernels store bf16
print("ok")
"""


def test_dense_prefill_probe_kernels_match_sdpa():
    """The probe's dense kernels (every variant, tiles scaled down) agree with causal SDPA under the
    Triton interpreter, so the ceiling they report is of correct kernels."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", PROBE_CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


DECODE_PROBE_CHECK = """
import sys, torch
sys.path.insert(0, "scripts")
import paged_decode_probe as probe
torch.manual_seed(0)
batch, heads, kv_heads, d, page, pages = 2, 4, 2, 32, 16, 8
cache = torch.randn(2, 3 * batch * pages, kv_heads, page, d)
block_table = torch.randperm(3 * batch * pages)[: batch * pages].view(batch, pages).to(torch.int32)
q, out = torch.randn(batch, heads, d), torch.empty(batch, heads, d)
k = cache[0][block_table.long()].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, pages * page, d)
v = cache[1][block_table.long()].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, pages * page, d)
def check(variant, length):
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k[:, :, :length], v[:, :, :length], enable_gqa=True).squeeze(2)
    out.fill_(float("nan"))
    probe.decode_probe(variant, q, cache, block_table, out, torch.full((batch,), length, dtype=torch.int32))()
    err = (out - ref).abs().max().item()
    assert err < 1e-4, (variant, length, err)
for variant in probe.VARIANTS:
    if not (variant["tma"] or variant.get("gdc")):  # the interpreter has no TMA or launch dependencies
        check(variant, pages * page)
check(dict(probe.POINTER, dyn_len=True, two_loops=True), pages * page - 28)  # a part-filled last tile
print("ok")
"""


def test_paged_decode_probe_kernels_match_sdpa():
    """The decode probe's pointer-load variants (its TMA and launch-dependency ones need a GPU) agree
    with SDPA over the same pages under the Triton interpreter, the masked second loop included."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", DECODE_PROBE_CHECK], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_runner_host_ab_builds_what_the_package_builds():
    """The A/B's list-built metadata (the runner's path before numpy) equals the package's."""
    args = ([1, 1, 1], [5, 16, 9], [[4, 0], [2, 7], [1, 3]], 8)
    shape = dict(num_tokens=4, num_seqs=4, max_blocks=3, max_query_len=1)
    lists = runner_host_ab.build_with_lists(*args, "cpu", **shape)
    package = AttentionMetadata.build(*args, "cpu", **shape)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        a, b = getattr(lists, name), getattr(package, name)
        assert a.dtype == b.dtype and a.tolist() == b.tolist(), name


@pytest.mark.parametrize("variant", ["n128_s2", "paged16_n128_s2"])
def test_gluon_prefill_probe_kernels_build_for_sm90(variant):
    """The Gluon probe's kernels (which need an sm_90 GPU to run) build with this Triton, and its
    A/B settings name switches the package's kernel has."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs Gluon's Hopper API")
    import gluon_prefill_probe as probe
    from compiled_attn.kernels import gluon_prefill

    compiled = probe.compile_sm90(variant)
    assert compiled.asm["cubin"] and "wgmma.mma_async" in compiled.asm["ptx"]
    for setting in probe.AB_SETTINGS.values():
        assert all(hasattr(gluon_prefill, name) for name in setting), setting
    other = probe.kernel_of(gluon_prefill.__file__)  # another version's kernel, loaded beside the package's
    assert set(other) == {"launch_args", "_prefill_kernel"} and other["launch_args"] is not gluon_prefill.launch_args


@pytest.mark.parametrize("variant", ["n128_s2", "n64_s4 loads only", "whole pages s2", "page mma early fused s2"])
def test_gluon_decode_probe_kernels_build_for_sm90(variant):
    """The streamed Gluon decode probe (GPU only) builds for sm_90 with this Triton, within the
    H100's shared memory; its load-only variant issues no tensor-core work, and the page-reading
    one's math is mma.sync tiles (a warp a KV head), not wgmma."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs Gluon's Hopper API")
    import gluon_decode_probe as probe

    compiled = probe.compile_sm90(variant)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and compiled.metadata.shared <= 227 * 1024
    if probe.VARIANTS[variant].get("page_mma"):
        assert "mma.sync" in ptx and "wgmma.mma_async" not in ptx and "atom.global" in ptx
    else:
        assert ("wgmma.mma_async" in ptx) == probe.VARIANTS[variant].get("compute", True)
