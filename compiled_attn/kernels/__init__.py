"""Triton kernels over the paged KV cache (needs the ``triton`` package).

- ``store_kv.store_kv`` — write new K/V through ``slot_mapping`` (fp8 quantisation included).
- ``paged_attention.paged_attention`` — unified prefill / prefix-prefill / decode / spec-decode attention of a
  flattened mixed batch, with split-KV (flash-decoding) for decode buckets.
- ``store_and_decode.store_and_decode`` — the store fused into a decode kernel.
- ``gluon_prefill`` — the Hopper (sm_90) kernel that ``paged_attention`` hands prefill-shaped steps
  in its scope to (Gluon: TMA loads, warp-specialised asynchronous wgmma; GPU-tested only).

Each has a ``*_reference`` twin in plain PyTorch, and an operator:
``torch.ops.compiled_attn.triton_store_kv``, ``.triton_paged_attention`` and ``.store_and_decode``
(a ``triton_op`` on CUDA so ``torch.compile`` sees the kernels; an opaque custom op elsewhere).
On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, read at launch time).
"""

# Submodules, not their functions: ``kernels.paged_attention.paged_attention`` etc. (re-exporting
# the functions under the modules' names would hide the modules).
from . import paged_attention, store_and_decode, store_kv

__all__ = ["paged_attention", "store_and_decode", "store_kv"]
