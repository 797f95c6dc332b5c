"""The Gluon prefill kernel reading K/V from the cache (package) against a variant reading the new
chunks from k/v (FUSE build, copies off), kernel alone; --once runs each once (for ncu).

The variant (``--variant FILE``, default .gpu/gp_loads_only.py): gluon_prefill.py with
gluon_prefill_fused_store.diff applied and its store condition made never true (``& (n_tiles < 0)``
on the producer's ``if (head % (H // KVH) == 0) & (j >= first_pos // BLOCK_N):``). Results:
gluon_prefill_fused_store_loads_h100.json."""
import sys, json, importlib.util, torch, triton
from triton.testing import do_bench_cudagraph
from compiled_attn.kernels import gluon_prefill as gp
spec = importlib.util.spec_from_file_location("compiled_attn.kernels._v", sys.argv[sys.argv.index("--variant") + 1] if "--variant" in sys.argv else ".gpu/gp_loads_only.py")
v_mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(v_mod)
H, KVH, D = 32, 8, 128
q_lens = [16384] if "1x16384" in sys.argv else [2048] * 8
gen = torch.Generator(device="cuda").manual_seed(0)
T = sum(q_lens)
q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
k = torch.randn(T, KVH, D, device="cuda", dtype=torch.bfloat16, generator=gen)
v = torch.randn(T, KVH, D, device="cuda", dtype=torch.bfloat16, generator=gen)
pages = [triton.cdiv(n, 16) for n in q_lens]
cache = torch.empty(2, sum(pages), 16, KVH, D, device="cuda", dtype=torch.bfloat16)
order = torch.randperm(sum(pages), device="cuda", generator=gen).to(torch.int32)
bt = torch.zeros(len(pages), max(pages), device="cuda", dtype=torch.int32)
for i, part in enumerate(order.split(pages)):
    bt[i, :len(part)] = part
pos = torch.cat([torch.arange(n, device="cuda") for n in q_lens])
seq = torch.repeat_interleave(torch.arange(len(q_lens), device="cuda"), torch.tensor(q_lens, device="cuda"))
slots = bt[seq, pos // 16].long() * 16 + pos % 16
cache.view(2, -1, KVH, D)[0, slots] = k; cache.view(2, -1, KVH, D)[1, slots] = v
qsl = torch.tensor([0] + q_lens, device="cuda", dtype=torch.int32).cumsum(0, dtype=torch.int32)
lens = torch.tensor(q_lens, device="cuda", dtype=torch.int32)
out = torch.empty_like(q)
def launcher(mod, **kw):
    grid, args, cx = mod.launch_args(q, cache, qsl, lens, bt, out, scale=D ** -0.5, **kw)
    return lambda: mod._prefill_kernel[grid](*args, **cx)
fns = {"cache (package)": launcher(gp), "new chunks from k/v": launcher(v_mod, k=k, v=v),
       "variant build, from cache": launcher(v_mod)}
if "--once" in sys.argv:
    for fn in fns.values():
        fn(); torch.cuda.synchronize()
    sys.exit()
outs = {}
for r in range(2):
    for name, fn in fns.items():
        fn(); outs[name] = out.clone()
        print(json.dumps(dict(case=f"{len(q_lens)}x{q_lens[0]}", setting=name, round=r, us=round(do_bench_cudagraph(fn, rep=300) * 1e3, 1))), flush=True)
ref = outs["cache (package)"].float()
print({n: ((o.float() - ref).norm() / ref.norm()).item() for n, o in outs.items()})
