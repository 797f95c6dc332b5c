"""Every op passes torch.library.opcheck (schema, fake impl, autograd registration)."""

from __future__ import annotations

import pytest
import torch

from compiled_attn import AttentionSpec
from batches import make_batch

SPEC = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32)


@pytest.mark.parametrize("backend", ["reference", "torch_native"])
def test_attention_opcheck(backend):
    b = make_batch("mixed", SPEC)
    one = torch.tensor(1.0)
    m = b.meta
    args = (b.q, b.k, b.v, b.kv_cache.clone(), m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping,
            torch.empty_like(b.q), one, one, None, backend, SPEC.softmax_scale, 0, 0.0, m.max_query_len)
    torch.library.opcheck(torch.ops.compiled_attn.attention.default, args)


def test_store_kv_opcheck():
    b = make_batch("spec_decode", SPEC)
    one = torch.tensor(1.0)
    torch.library.opcheck(torch.ops.compiled_attn.store_kv.default,
                          (b.k, b.v, b.kv_cache.clone(), b.meta.slot_mapping, one, one))
