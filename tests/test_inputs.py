"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compiled_attn as ca
from compiled_attn import AttentionMetadata, AttentionSpec

SPEC = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32)


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
    ],
)
def test_layer_checks_tensor_metadata(mutate, message):
    meta = AttentionMetadata.build([3], [3], [[1]], block_size=16)
    mutate(meta)
    cache = torch.zeros(2, 4, 16, 2, 32)
    with pytest.raises(ValueError, match=message):
        _layer()(*_inputs(), cache, meta)


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
    with pytest.raises(ValueError, match="meta.query_start_loc must be torch.int32"):
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
