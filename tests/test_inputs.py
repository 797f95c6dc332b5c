"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compiled_attn as ca
from compiled_attn import AttentionMetadata, AttentionSpec

SPEC = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32)
FP8 = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, kv_cache_dtype="fp8_e4m3")


def _inputs(num_tokens=3, dtype=torch.float32):
    return (torch.randn(num_tokens, 4, 32, dtype=dtype), torch.randn(num_tokens, 2, 32, dtype=dtype),
            torch.randn(num_tokens, 2, 32, dtype=dtype))


def _layer():
    return ca.Attention(SPEC, backend="reference", device="cpu")


def test_spec_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionSpec(num_heads=6, num_kv_heads=4, head_size=32)
    with pytest.raises(ValueError, match="alibi_slopes has 2 entries"):
        AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, alibi_slopes=[0.1, 0.2])
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="scale must be positive"):
        AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, scale=0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=float("inf")), "scale must be positive and finite"),
    (dict(logits_soft_cap=float("nan")), "logits_soft_cap must be positive and finite"),
    (dict(logits_soft_cap=float("inf")), "logits_soft_cap must be positive and finite"),
    (dict(sliding_window=2.5), r"sliding_window must be positive \(an int"),
    (dict(sliding_window=True), r"sliding_window must be positive \(an int"),
    (dict(sliding_window=-3), r"sliding_window must be positive \(an int"),
    (dict(alibi_slopes=[0.5, float("nan"), 0.25, 0.125]), "alibi_slopes must be finite"),
])
def test_spec_rejects_values_that_would_silence_every_output(kwargs, message):
    # NaN and inf caps, scales and slopes turn every output into NaN or zeros without an error.
    with pytest.raises(ValueError, match=message):
        AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, **kwargs)


def test_spec_takes_a_numpy_window_as_an_int():
    import numpy as np

    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, sliding_window=np.int64(8))
    assert spec.sliding_window == 8 and type(spec.sliding_window) is int


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(query_lens=[3], seq_lens=[2], block_tables=[[0]]), "must be >= query_len"),
        (dict(query_lens=[3], seq_lens=[40], block_tables=[[0]]), "needs 3 blocks"),
        (dict(query_lens=[3], seq_lens=[3], block_tables=[[9]], num_blocks=4), "outside the cache"),
        (dict(query_lens=[3], seq_lens=[3], block_tables=[[-1]]), "outside the cache"),
        (dict(query_lens=[1, 1], seq_lens=[1, 1], block_tables=[[2], [2]]), "same cache slot twice"),
        (dict(query_lens=[3], seq_lens=[3], block_tables=[[0]], num_tokens=2), "does not fit"),
        (dict(query_lens=[3, 1], seq_lens=[3], block_tables=[[0]]), "one entry per sequence"),
    ],
)
def test_metadata_build_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionMetadata.build(block_size=16, **kwargs)


def test_metadata_padding():
    meta = AttentionMetadata.build([2, 1], [2, 5], [[3], [1, 0]], block_size=4, num_tokens=5, num_seqs=4, max_blocks=3)
    assert meta.query_start_loc.tolist() == [0, 2, 3, 3, 3]
    assert meta.seq_lens.tolist() == [2, 5, 0, 0]
    assert meta.slot_mapping.tolist() == [12, 13, 0, -1, -1]
    assert meta.block_table.tolist()[1] == [1, 0, 0]
    assert meta.block_table.shape == (4, 3)
    assert meta.max_query_len == 5


def _built_by_hand(query_lens, seq_lens, block_tables, block_size, num_tokens, num_seqs, max_blocks):
    """What ``AttentionMetadata.build`` must return, one token and one block at a time."""
    starts, slots = [0], []
    for q, n, blocks in zip(query_lens, seq_lens, block_tables):
        starts.append(starts[-1] + q)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n - q, n)]
    table = [list(b) + [0] * (max_blocks - len(b)) for b in block_tables]
    table += [[0] * max_blocks] * (num_seqs - len(block_tables))
    return (starts + [starts[-1]] * (num_seqs - len(seq_lens)), list(seq_lens) + [0] * (num_seqs - len(seq_lens)),
            table, slots + [-1] * (num_tokens - len(slots)))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), block_size=st.sampled_from([1, 4, 16]), num_seqs=st.integers(0, 6))
def test_metadata_build_matches_token_by_token(data, block_size, num_seqs):
    seq_lens = data.draw(st.lists(st.integers(0, 40), min_size=num_seqs, max_size=num_seqs))
    query_lens = [data.draw(st.integers(0, n)) for n in seq_lens]
    widths = [-(-n // block_size) + data.draw(st.integers(0, 2)) for n in seq_lens]
    pool = data.draw(st.permutations(range(sum(widths) + 3)))  # distinct blocks: no slot written twice
    tables, used = [], 0
    for w in widths:
        tables.append(list(pool[used: used + w]))
        used += w
    pad_tokens, pad_seqs = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 2))
    shape = dict(num_tokens=sum(query_lens) + pad_tokens, num_seqs=num_seqs + pad_seqs,
                 max_blocks=max(widths, default=0) + 1)
    # (max_query_len 1 would ask for a decode layout, which sequences without new tokens are not)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, max_query_len=max(2, sum(query_lens)),
                                   **shape)
    starts, lens, table, slots = _built_by_hand(query_lens, seq_lens, tables, block_size, **shape)
    assert meta.query_start_loc.tolist() == starts and meta.query_start_loc.dtype == torch.int32
    assert meta.seq_lens.tolist() == lens and meta.seq_lens.dtype == torch.int32
    assert meta.block_table.tolist() == table and meta.block_table.dtype == torch.int32
    assert meta.slot_mapping.tolist() == slots and meta.slot_mapping.dtype == torch.int64


@settings(max_examples=100, deadline=None)
@given(data=st.data(), num_seqs=st.integers(1, 5))
def test_metadata_build_names_the_first_sequence_with_a_block_outside_the_cache(data, num_seqs):
    num_blocks = 64
    widths = data.draw(st.lists(st.integers(1, 4), min_size=num_seqs, max_size=num_seqs))
    pool = data.draw(st.permutations(range(num_blocks)))
    tables = [list(pool[4 * s: 4 * s + w]) for s, w in enumerate(widths)]
    bad_seq = data.draw(st.integers(0, num_seqs - 1))
    bad_id = data.draw(st.sampled_from([-1, -7, num_blocks, num_blocks + 100]))
    tables[bad_seq][data.draw(st.integers(0, widths[bad_seq] - 1))] = bad_id
    with pytest.raises(ValueError, match=rf"sequence {bad_seq}: block table entries \[{bad_id}\] are outside"):
        AttentionMetadata.build([1] * num_seqs, [1] * num_seqs, tables, 16, num_blocks=num_blocks)


def test_metadata_build_takes_tuples_and_tensors():
    lists = AttentionMetadata.build([2, 1], [2, 5], [[3], [1, 0]], block_size=4)
    other = AttentionMetadata.build((2, 1), torch.tensor([2, 5]), [(3,), torch.tensor([1, 0])], block_size=4)
    for a, b in zip(lists.__dict__.values(), other.__dict__.values()):
        assert a.tolist() == b.tolist() if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.block_table.fill_(7), "block_table points outside the cache"),
        (lambda m: m.slot_mapping.fill_(5), "same cache slot twice"),
        (lambda m: m.slot_mapping.__setitem__(0, 10_000), "slot_mapping holds slots outside"),
        (lambda m: m.seq_lens.fill_(1), "shorter than its query_len"),
        (lambda m: m.query_start_loc.__setitem__(0, 1), "query_start_loc must start at 0"),
        # A slot inside the cache but not where the block table puts the token: attention would
        # read stale K/V at that position, and the write lands in another block.
        (lambda m: m.slot_mapping.__setitem__(1, 40), r"slot_mapping\[1\] is 40, but that token \(sequence 0, "
                                                       r"position 1\) belongs at slot 17"),
        (lambda m: m.slot_mapping.__setitem__(2, -1), r"slot_mapping\[2\] is -1, but that token"),
        (lambda m: m.slot_mapping.__setitem__(3, 40), r"slot_mapping\[3\] is 40, but token 3 is padding"),
    ],
)
def test_layer_checks_tensor_metadata(mutate, message):
    meta = AttentionMetadata.build([3], [3], [[1]], block_size=16, num_tokens=4)
    mutate(meta)
    cache = torch.zeros(2, 4, 16, 2, 32)
    with pytest.raises(ValueError, match=message):
        _layer()(*_inputs(4), cache, meta)


@pytest.mark.parametrize("backend", ["reference", "torch_native"])
def test_unused_block_table_entries_may_hold_anything(backend):
    # Entries past a sequence's blocks are never checked (kernels never read them), so the PyTorch
    # backends must not index the cache with them either.
    meta = AttentionMetadata.build([3, 1], [3, 20], [[1], [2, 3]], block_size=16, max_blocks=3)
    cache = torch.randn(2, 4, 16, 2, 32)
    layer, (q, k, v) = ca.Attention(SPEC, backend=backend, device="cpu"), _inputs(4)
    want = layer(q, k, v, cache.clone(), meta)
    meta.block_table[0, 1:] = torch.tensor([99, -7], dtype=torch.int32)
    meta.block_table[1, 2] = 1000
    torch.testing.assert_close(layer(q, k, v, cache.clone(), meta), want)


def test_checks_run_under_inference_mode():
    # Inference tensors keep no in-place write counter: each metadata object is checked once.
    with torch.inference_mode():
        layer = ca.Attention(FP8, backend="reference", device="cpu")
        cache = torch.zeros(2, 4, 16, 2, 32, dtype=torch.float8_e4m3fn)
        meta = AttentionMetadata.build([3], [3], [[1]], block_size=16)
        layer(*_inputs(), cache, meta)
        layer(*_inputs(), cache, meta)
        meta.slot_mapping[1] = 40
        with pytest.raises(ValueError, match="belongs at slot 17"):
            layer(*_inputs(), cache, dataclasses.replace(meta))  # a new object is checked afresh


def test_metadata_changed_in_place_is_checked_again():
    layer, meta, cache = _layer(), AttentionMetadata.build([3], [3], [[1]], block_size=16), torch.zeros(2, 4, 16, 2, 32)
    layer(*_inputs(), cache, meta)
    meta.seq_lens.fill_(1)
    with pytest.raises(ValueError, match="shorter than its query_len"):
        layer(*_inputs(), cache, meta)


@pytest.mark.parametrize("change, message", [
    (lambda m: AttentionMetadata(m.query_start_loc, torch.tensor([3, 3], dtype=torch.int32), m.block_table,
                                 m.slot_mapping, 3), r"query_start_loc must be \[num_seqs \+ 1\] = \[3\]"),
    (lambda m: AttentionMetadata(m.query_start_loc, m.seq_lens, m.block_table[0], m.slot_mapping, 3),
     r"block_table must be \[num_seqs, max_blocks\]"),
])
def test_metadata_shapes_are_checked_even_with_value_checks_off(monkeypatch, change, message):
    # Shapes are static (free under compile and capture): checked whatever COMPILED_ATTN_CHECKS says.
    monkeypatch.setenv("COMPILED_ATTN_CHECKS", "never")
    bad = change(AttentionMetadata.build([3], [3], [[1]], block_size=16))
    with pytest.raises(ValueError, match=message):
        _layer()(*_inputs(), torch.zeros(2, 4, 16, 2, 32), bad)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.k_scale.fill_(float("nan")), "k_scale is nan; an fp8 cache's scale must be positive and finite"),
    (lambda a: a.v_scale.fill_(0.0), "v_scale is 0.0; an fp8 cache's scale must be positive"),
    (lambda a: setattr(a, "k_scale", torch.tensor([2.0, 9.0])), "k_scale must be one float32 value"),
    (lambda a: setattr(a, "v_scale", torch.tensor(1.0, dtype=torch.float64)), "v_scale must be one float32 value"),
    (lambda a: setattr(a, "v_scale", torch.ones((), device="meta")), "v_scale is on meta but q is on cpu"),
])
def test_fp8_scales_are_checked(change, message):
    layer = ca.Attention(FP8, backend="reference", device="cpu")
    change(layer)
    cache = torch.zeros(2, 4, 16, 2, 32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=message):
        layer(*_inputs(), cache, AttentionMetadata.build([3], [3], [[1]], block_size=16))


@pytest.mark.parametrize("change", [lambda a: a.k_scale.fill_(float("inf")),
                                    lambda a: setattr(a, "k_scale", torch.tensor(float("inf")))])
def test_fp8_scales_are_read_again_after_a_change(change):
    layer = ca.Attention(FP8, backend="reference", device="cpu")
    cache = torch.zeros(2, 4, 16, 2, 32, dtype=torch.float8_e4m3fn)
    layer(*_inputs(), cache, AttentionMetadata.build([3], [3], [[1]], block_size=16))
    change(layer)  # in place, or a new tensor in its place
    with pytest.raises(ValueError, match="k_scale is inf"):
        layer(*_inputs(), cache, AttentionMetadata.build([3], [3], [[1]], block_size=16))


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half()])
def test_a_model_cast_to_half_precision_keeps_float32_scales_and_slopes(cast):
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, alibi_slopes=[0.5, 0.25, 0.125, 0.0625])
    model = cast(torch.nn.Sequential(ca.Attention(spec, backend="reference", device="cpu")))
    layer = model[0]
    assert {t.dtype for t in (layer.k_scale, layer.v_scale, layer.alibi_slopes)} == {torch.float32}
    dtype = next(d for d in (torch.bfloat16, torch.float16) if d in layer.backend.dtypes)
    meta = AttentionMetadata.build([3], [3], [[1]], block_size=16)
    assert layer(*_inputs(dtype=dtype), torch.zeros(2, 4, 16, 2, 32, dtype=dtype), meta).dtype == dtype


def test_alibi_slopes_device_is_checked():
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, alibi_slopes=[0.5, 0.25, 0.125, 0.0625])
    layer = ca.Attention(spec, backend="reference", device="cpu")
    layer.alibi_slopes = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match="alibi_slopes is on meta"):
        layer(*_inputs(), torch.zeros(2, 4, 16, 2, 32), AttentionMetadata.build([3], [3], [[1]], block_size=16))


def test_ops_check_shapes_on_direct_calls():
    meta = AttentionMetadata.build([3], [3], [[1]], block_size=16)
    cache, one = torch.zeros(2, 4, 16, 2, 32), torch.ones(())
    with pytest.raises(ValueError, match=r"k must be \[3, 2, 32\]"):  # one KV head would broadcast into two
        ca.ops.store_kv(torch.randn(3, 1, 32), torch.randn(3, 1, 32), cache, meta.slot_mapping, one, one)
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="sliding_window must be positive, or 0 for none; got -1"):
        ca.ops.attention(q, k, v, cache, meta, torch.empty_like(q), backend="reference", scale=0.1,
                         sliding_window=-1, k_scale=one, v_scale=one)
    with pytest.raises(ValueError, match=r"q and out must both be"):
        ca.ops.attention(q, k, v, cache, meta, torch.empty(3, 4, 16), backend="reference", scale=0.1,
                         k_scale=one, v_scale=one)
    with pytest.raises(ValueError, match=r"needs the cache's head_size \(32\) and a multiple of its 2 KV heads"):
        ca.ops.attention(q[:, :3], k, v, cache, meta, q[:, :3], backend="reference", scale=0.1, k_scale=one,
                         v_scale=one)
    with pytest.raises(ValueError, match="slot_mapping must be torch.int64, got torch.int32"):
        ca.ops.attention(q, k, v, cache, dataclasses.replace(meta, slot_mapping=meta.slot_mapping.int()),
                         torch.empty_like(q), backend="reference", scale=0.1, k_scale=one, v_scale=one)


def test_graph_runner_checks_block_ids_against_the_cache():
    from compiled_attn.graphs import BatchLayout, CUDAGraphRunner

    runner = CUDAGraphRunner(lambda x, meta: x, token_input_specs=[((), torch.float32)], block_size=4, max_blocks=2,
                             max_num_seqs=2, decode_buckets=[2], prefill_buckets=[8], device="cpu", num_blocks=8)
    runner.capture()
    with pytest.raises(ValueError, match="outside the cache"):
        runner.run([torch.ones(2)], BatchLayout([1, 1], [2, 2], [[0], [8]]))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, c: (q[:, :3], k, v, c), r"q must be \[num_tokens, 4, 32\]"),
        (lambda q, k, v, c: (q, k[:, :1], v, c), r"k must be \[3, 2, 32\]"),
        (lambda q, k, v, c: (q, k, v.double(), c), "v has dtype torch.float64"),
        (lambda q, k, v, c: (q, k, v, c.half()), "kv_cache dtype torch.float16 does not match"),
        (lambda q, k, v, c: (q, k, v, c[0]), "kv_cache must be"),
        (lambda q, k, v, c: (q, k, v, c.transpose(1, 2).contiguous().transpose(1, 2)), "kv_cache must be contiguous"),
        (lambda q, k, v, c: (q.int(), k.int(), v.int(), c), "dtype torch.int32 is not supported"),
    ],
)
def test_layer_rejects_bad_tensors(change, message):
    meta = AttentionMetadata.build([3], [3], [[1]], block_size=16)
    q, k, v, cache = change(*_inputs(), torch.zeros(2, 4, 16, 2, 32))
    with pytest.raises(ValueError, match=message):
        _layer()(q, k, v, cache, meta)


def test_metadata_dtype_is_checked():
    meta = AttentionMetadata.build([3], [3], [[1]], block_size=16)
    bad = AttentionMetadata(meta.query_start_loc.long(), meta.seq_lens, meta.block_table, meta.slot_mapping, 3)
    with pytest.raises(ValueError, match="query_start_loc must be torch.int32"):
        _layer()(*_inputs(), torch.zeros(2, 4, 16, 2, 32), bad)


def test_unknown_and_unsupported_backends():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ca.Attention(SPEC, backend="nope", device="cpu")
    capped = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, logits_soft_cap=5.0)
    with pytest.raises(ValueError, match="torch_native.*logits_soft_cap"):
        ca.Attention(capped, backend="torch_native", device="cpu")


def test_environment_override(monkeypatch):
    monkeypatch.setenv("COMPILED_ATTN_BACKEND", "reference")
    assert ca.Attention(SPEC, device="cpu").backend.name == "reference"
    # An explicit argument beats the environment.
    assert ca.Attention(SPEC, backend="torch_native", device="cpu").backend.name == "torch_native"
    monkeypatch.setenv("COMPILED_ATTN_BACKEND", "torch_native")
    capped = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, logits_soft_cap=5.0)
    with pytest.raises(ValueError, match="'torch_native' cannot serve"):
        ca.Attention(capped, device="cpu")


def test_auto_selection_falls_back_with_reasons():
    capped = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, logits_soft_cap=5.0)
    assert ca.Attention(capped, device="cpu").backend.name == "reference"
    table = ca.available_backends(capped, device="cpu")
    assert table["reference"] == "available"
    assert "logits_soft_cap" in table["torch_native"]


def test_selection_error_lists_every_backend(monkeypatch):
    from compiled_attn import backends

    monkeypatch.setitem(backends.PRIORITY, "cpu", ("torch_native",))
    capped = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, logits_soft_cap=5.0)
    with pytest.raises(ValueError) as err:
        ca.Attention(capped, device="cpu")
    for name in backends.BACKENDS:
        assert name in str(err.value)
