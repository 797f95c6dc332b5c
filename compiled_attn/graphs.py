"""CUDAGraphRunner: capture a whole model step once per batch-size bucket, replay it per step.

Decode buckets are sequence counts (one new token each); prefill buckets are token counts.
Every bucket's graph reads one set of static buffers sized for the largest bucket (slices of
them, so addresses are fixed) and all graphs share one memory pool, captured largest first.

``torch.compile(mode="reduce-overhead")`` also records CUDA graphs, but keyed on whatever
shapes arrive: a new batch size means a new recording mid-serving, and the metadata's values are
copied in by the compiler rather than written by us. This runner makes the buckets explicit,
captures them all at start-up, and pads each batch itself; pass it a step compiled with the
default mode (``torch.compile(step, fullgraph=True)``), not ``reduce-overhead``.

On a CPU (or with ``use_graphs=False``) the runner still pads to buckets and calls the step
eagerly, so compiled steps see fixed shapes and the padding path is the same everywhere.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.utils._pytree as pytree

from .metadata import PAD_SLOT, AttentionMetadata

logger = logging.getLogger(__name__)

StepFn = Callable[..., torch.Tensor]
"""``step_fn(*token_inputs, meta) -> Tensor`` whose dim 0 is tokens ``[T, ...]`` or sequences
``[B, ...]`` (say which with ``output_rows``)."""


def default_decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to ``max_num_seqs``."""
    small = [b for b in (1, 2, 4) if b < max_num_seqs]
    return small + list(range(8, max_num_seqs + 1, 8)) + ([max_num_seqs] if max_num_seqs % 8 and max_num_seqs > 4 else [])


def default_prefill_buckets(max_num_tokens: int) -> list[int]:
    """Powers of two from 16 up to ``max_num_tokens`` (which is always included)."""
    buckets, b = [], 16
    while b < max_num_tokens:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_tokens]


@dataclasses.dataclass(frozen=True)
class Bucket:
    kind: str  # "decode" or "prefill"
    num_tokens: int
    num_seqs: int


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """One step's batch on the host: per-sequence lengths and block lists."""

    query_lens: Sequence[int]
    seq_lens: Sequence[int]
    block_tables: Sequence[Sequence[int]]

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)


def choose_bucket(
    batch: BatchLayout, decode_buckets: Sequence[int], prefill_buckets: Sequence[int], max_num_seqs: int,
    max_blocks: int,
) -> Bucket | str:
    """The smallest bucket the batch fits, or the reason none does (the step then runs eagerly)."""
    num_seqs = len(batch.seq_lens)
    widest = max((len(b) for b in batch.block_tables), default=0)
    if widest > max_blocks:
        return f"a sequence uses {widest} blocks, over the {max_blocks} the graphs were captured with"
    if batch.is_decode and decode_buckets:
        i = bisect.bisect_left(decode_buckets, num_seqs)
        if i < len(decode_buckets):
            return Bucket("decode", decode_buckets[i], decode_buckets[i])
    if num_seqs > max_num_seqs:
        return f"{num_seqs} sequences, over max_num_seqs={max_num_seqs}"
    i = bisect.bisect_left(prefill_buckets, batch.num_tokens)
    if i == len(prefill_buckets):
        largest = prefill_buckets[-1] if prefill_buckets else 0
        return f"{batch.num_tokens} tokens, over the largest prefill bucket ({largest})"
    return Bucket("prefill", prefill_buckets[i], max_num_seqs)


def _leaf_shapes(meta: AttentionMetadata) -> tuple:
    leaves, spec = pytree.tree_flatten(meta)
    return tuple(tuple(t.shape) for t in leaves), str(spec)


class CUDAGraphRunner:
    """Capture ``step_fn`` per bucket at start-up; ``run`` pads a batch, replays, unpads.

    >>> step = lambda x, meta: x * 2
    >>> runner = CUDAGraphRunner(step, token_input_specs=[((), torch.float32)], block_size=4, max_blocks=2,
    ...                          max_num_seqs=4, decode_buckets=[1, 2, 4], prefill_buckets=[8], device="cpu")
    >>> runner.capture()
    >>> runner.run([torch.ones(3)], BatchLayout([2, 1], [2, 1], [[0], [1]])).tolist()
    [2.0, 2.0, 2.0]

    ``token_input_specs`` gives each per-token input's trailing shape and dtype (``input_ids``:
    ``((), torch.int64)``). ``plan`` (a backend's host-side ``plan``) runs on every batch; if it
    returns metadata shaped unlike what was captured, the step runs eagerly with a logged reason —
    never a stale replay. ``num_blocks`` (the cache's size) has every batch's block ids checked
    against it on the host, where the lists are, before they reach a captured kernel.
    """

    def __init__(
        self,
        step_fn: StepFn,
        *,
        token_input_specs: Sequence[tuple[tuple[int, ...], torch.dtype]],
        block_size: int,
        max_blocks: int,
        max_num_seqs: int,
        decode_buckets: Sequence[int] | None = None,
        prefill_buckets: Sequence[int] | None = None,
        device: torch.device | str = "cuda",
        plan: Callable[[AttentionMetadata], AttentionMetadata] | None = None,
        use_graphs: bool | None = None,
        progress: bool = False,
        output_rows: str = "tokens",
        num_blocks: int | None = None,
    ) -> None:
        if output_rows not in ("tokens", "seqs"):
            raise ValueError(f"output_rows must be 'tokens' or 'seqs', got {output_rows!r}")
        self.output_rows = output_rows
        self.step_fn = step_fn
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks = max_blocks
        self.max_num_seqs = max_num_seqs
        self.decode_buckets = sorted(decode_buckets if decode_buckets is not None else default_decode_buckets(max_num_seqs))
        self.prefill_buckets = sorted(prefill_buckets if prefill_buckets is not None else default_prefill_buckets(512))
        if self.decode_buckets and self.decode_buckets[-1] > max_num_seqs:
            raise ValueError(f"decode bucket {self.decode_buckets[-1]} exceeds max_num_seqs={max_num_seqs}")
        self.plan = plan
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; pass use_graphs=False to pad without graphs")
        self.progress = progress
        max_tokens = max(self.decode_buckets[-1:] + self.prefill_buckets[-1:])
        # One set of static buffers sized for the largest bucket; each bucket reads a prefix slice.
        self._tokens = [torch.zeros((max_tokens, *shape), dtype=dtype, device=self.device)
                        for shape, dtype in token_input_specs]
        self._starts = torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=self.device)
        self._seq_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=self.device)
        self._block_table = torch.zeros(max_num_seqs, max_blocks, dtype=torch.int32, device=self.device)
        self._slots = torch.full((max_tokens,), PAD_SLOT, dtype=torch.int64, device=self.device)
        self._graphs: dict[Bucket, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None, tuple]] = {}
        self.pool = None
        self.graph_memory_bytes = 0
        self.last_eager_reason: str | None = None

    # -- buckets -------------------------------------------------------------------------------

    def buckets(self) -> list[Bucket]:
        decode = [Bucket("decode", b, b) for b in self.decode_buckets]
        prefill = [Bucket("prefill", t, self.max_num_seqs) for t in self.prefill_buckets]
        return sorted(decode + prefill, key=lambda b: (b.num_tokens, b.num_seqs), reverse=True)

    def _static_meta(self, bucket: Bucket) -> AttentionMetadata:
        t, b = bucket.num_tokens, bucket.num_seqs
        return AttentionMetadata(self._starts[: b + 1], self._seq_lens[:b], self._block_table[:b],
                                 self._slots[:t], max_query_len=1 if bucket.kind == "decode" else t)

    def _inputs(self, bucket: Bucket) -> list[torch.Tensor]:
        return [buf[: bucket.num_tokens] for buf in self._tokens]

    # -- capture -------------------------------------------------------------------------------

    def capture(self) -> None:
        """Warm up and (on CUDA) capture every bucket, largest first, into one memory pool."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if self.use_graphs else 0
        if self.use_graphs:
            self.pool = torch.cuda.graph_pool_handle()
        for bucket in tqdm(self.buckets(), desc="capturing" if self.use_graphs else "warming up",
                           disable=not self.progress):
            self._reset_buffers()
            meta = self._static_meta(bucket)
            planned = self.plan(meta) if self.plan else meta
            if not self.use_graphs:
                self.step_fn(*self._inputs(bucket), planned)  # compile/warm this shape now
                self._graphs[bucket] = (None, None, _leaf_shapes(planned))
                continue
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile, autotune and allocate outside the graph
                    self.step_fn(*self._inputs(bucket), planned)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.step_fn(*self._inputs(bucket), planned)
            self._graphs[bucket] = (graph, output, _leaf_shapes(planned))
        torch.cuda.synchronize(self.device) if self.use_graphs else None
        seconds = time.perf_counter() - start
        if self.use_graphs:
            self.graph_memory_bytes = max(free_before - torch.cuda.mem_get_info(self.device)[0], 0)
        summary = (f"captured {len(self._graphs)} buckets in {seconds:.1f} s "
                   f"(graph memory {self.graph_memory_bytes / 2**20:.1f} MiB)" if self.use_graphs else
                   f"warmed up {len(self._graphs)} buckets in {seconds:.1f} s (no CUDA graphs on {self.device.type})")
        logger.info(summary)
        if self.progress:
            print(summary)

    def _reset_buffers(self) -> None:
        # Capture with an empty batch: padding everywhere, nothing stored, nothing read.
        for buf in self._tokens:
            buf.zero_()
        self._starts.zero_()
        self._seq_lens.zero_()
        self._block_table.zero_()
        self._slots.fill_(PAD_SLOT)

    # -- run -----------------------------------------------------------------------------------

    def run(self, token_inputs: Sequence[torch.Tensor], batch: BatchLayout) -> torch.Tensor:
        """Pad ``batch`` to its bucket, replay (or run eagerly), return the unpadded output.

        ``token_inputs`` are the real tokens' inputs (dim 0 = ``batch.num_tokens``). The result
        is a view of a static buffer on the graph path: consume it before the next ``run``.
        """
        bucket = choose_bucket(batch, self.decode_buckets, self.prefill_buckets, self.max_num_seqs, self.max_blocks)
        if isinstance(bucket, str) or bucket not in self._graphs:
            reason = bucket if isinstance(bucket, str) else f"bucket {bucket} was not captured"
            return self._eager(token_inputs, batch, reason)
        # Built on the host and copied into the static buffers: the step itself allocates nothing.
        meta = AttentionMetadata.build(batch.query_lens, batch.seq_lens, batch.block_tables, self.block_size,
                                       "cpu", num_tokens=bucket.num_tokens, num_seqs=bucket.num_seqs,
                                       max_blocks=self.max_blocks, num_blocks=self.num_blocks,
                                       max_query_len=1 if bucket.kind == "decode" else bucket.num_tokens)
        planned = self.plan(meta) if self.plan else meta
        graph, output, captured_shapes = self._graphs[bucket]
        if _leaf_shapes(planned) != captured_shapes:
            return self._eager(token_inputs, batch, "the backend's plan differs from the captured layout")
        self._write(bucket, token_inputs, planned)
        if graph is None:
            output = self.step_fn(*self._inputs(bucket), self._static_meta(bucket))
        else:
            graph.replay()
        return output[: batch.num_tokens if self.output_rows == "tokens" else len(batch.seq_lens)]

    def _write(self, bucket: Bucket, token_inputs: Sequence[torch.Tensor], meta: AttentionMetadata) -> None:
        t, b = bucket.num_tokens, bucket.num_seqs
        for buf, x in zip(self._tokens, token_inputs):
            buf[: x.shape[0]].copy_(x, non_blocking=True)
            buf[x.shape[0]: t].zero_()
        self._starts[: b + 1].copy_(meta.query_start_loc, non_blocking=True)
        self._seq_lens[:b].copy_(meta.seq_lens, non_blocking=True)
        self._block_table[:b].copy_(meta.block_table, non_blocking=True)
        self._slots[:t].copy_(meta.slot_mapping, non_blocking=True)

    def _eager(self, token_inputs: Sequence[torch.Tensor], batch: BatchLayout, reason: str) -> torch.Tensor:
        logger.info("running a step eagerly: %s", reason)
        self.last_eager_reason = reason
        meta = AttentionMetadata.build(batch.query_lens, batch.seq_lens, batch.block_tables, self.block_size,
                                       self.device, num_blocks=self.num_blocks)
        meta = self.plan(meta) if self.plan else meta
        return self.step_fn(*token_inputs, meta)
