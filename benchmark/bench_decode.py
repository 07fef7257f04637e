"""End-to-end decode speed, dense and sparse, in one process.

    python benchmark/bench_decode.py --model llama-3-8b                     # random weights at real shapes
    python benchmark/bench_decode.py --checkpoint_path checkpoints/X        # a real checkpoint and its thresholds
    torchrun --nproc_per_node=2 benchmark/bench_decode.py --model llama-3-70b   # tensor parallel

Protocol (the reference's): batch 1, a 5-token prompt, 200 new tokens, the decode step compiled with
mode="reduce-overhead" (CUDA graphs), one warm-up then the median of 3 runs. Tokens/s time whole generations (the
prefill included, eager as GPT-Fast's unless --compile_prefill); each row splits that run into the prefill and the
time per later token, and holds a torch profiler split of one decode step (the same captured graphs): kernel time
by category (sparse GEMV per projection, cuBLAS, attention, norms, sampling, other) and the launch gaps left over,
and a profile of one prefill (host against GPU time). Random models get uniform thresholds calibrated on a
random-token prefill; the sparsity changes by copying thresholds, and the number of recompilations this causes is
recorded (it should be 0).
"""
import argparse
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo.utils
import torch._inductor.config
import torch.distributed as dist
import triton

from benchmark.common import copy_bandwidth, write_result
from cli import add_int4_args, fraction, int4_quant, positive_int, user_errors
from generate import (SPARSE_KERNELS, decode_one_token, decode_one_token_persistent, measure_realized_sparsity,
                      persistent_embedding, persistent_layers, prefill, set_pdl, timed_generate, weight_bytes)
import tp  # tp.ONE_SHOT is read through the module: set_one_shot rebinds it
from model import CONFIGS, RMSNorm, random_model
from sparse import LAYER_GROUPS, catsify, cats_layers, set_cats_thresholds, sparse_layers, sparsify
from sparse_gemv.persistent import BLOCK_ROWS, GROUPED_STRIP, MAX_REGISTERS, STAGES
from thresholds.file import MAX_SPARSITY, MODES
from tp import AllReduceRMSNorm, apply_tp, maybe_init_dist, set_one_shot, shutdown_dist

SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65)


@torch.no_grad()
def calibrate_on_random_prefill(model, sparsities, n_tokens: int = 512, seed: int = 0) -> dict:
    """Per layer and projection, the quantile of |x| at each sparsity over a random-token prefill.
    Row-sharded inputs (tensor parallel) are gathered first, so every rank gets the same thresholds."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=gen).to(model.norm.weight.device)
    levels = torch.tensor(sparsities, dtype=torch.float32)
    tables, handles = {}, []
    tp = dist.is_initialized() and dist.get_world_size() > 1

    def hook(i, path, layer):
        def pre(module, args):
            x = args[0].reshape(-1, layer.in_features).float().abs()
            if tp and path in ("attention.wo", "feed_forward.w2"):
                parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, x.contiguous())
                x = torch.cat(parts, dim=1)
            flat = x.flatten()
            if flat.numel() > 1 << 24:
                flat = flat[torch.randint(flat.numel(), (1 << 24,), device=flat.device)]
            q = torch.quantile(flat, levels.to(flat.device)).cpu()
            for proj in LAYER_GROUPS[path]:
                tables[(i, proj)] = q
        return pre

    for i, path, layer in sparse_layers(model):
        handles.append(layer.register_forward_pre_hook(hook(i, path, layer)))
    model.setup_caches(1, n_tokens)
    model(idx, torch.arange(n_tokens, device=idx.device))
    for h in handles:
        h.remove()
    return {s: {k: float(v[j]) if s > 0 else 0.0 for k, v in tables.items()} for j, s in enumerate(sparsities)}


@torch.no_grad()
def calibrate_cats_on_random_prefill(model, sparsities, n_tokens: int = 512, seed: int = 0) -> dict:
    """Per CATS MLP, the quantile of |SiLU(x W_gate^T)| at each sparsity over a random-token prefill: {s: [L]}."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=gen).to(model.norm.weight.device)
    levels = torch.tensor(sparsities, dtype=torch.float32)
    table = torch.zeros(len(sparsities), len(model.layers))
    handles = []

    def hook(i):
        def pre(module, args):
            a = module.gate_activation(args[0]).float().abs().flatten()
            table[:, i] = torch.quantile(a, levels.to(a.device)).cpu()
        return pre

    for i, ff in cats_layers(model):
        handles.append(ff.register_forward_pre_hook(hook(i)))
    model.setup_caches(1, n_tokens)
    model(idx, torch.arange(n_tokens, device=idx.device))
    for h in handles:
        h.remove()
    return {s: table[j] if s > 0 else torch.zeros(len(model.layers)) for j, s in enumerate(sparsities)}


def set_uniform(model, table: dict) -> None:
    with torch.no_grad():
        for i, path, layer in sparse_layers(model):
            for g, proj in enumerate(LAYER_GROUPS[path]):
                layer.thresholds[g].fill_(table[(i, proj)])


def time_decode(model, decode_fn, prompt, new_tokens: int, runs: int = 3,
                prefill_fn=prefill) -> tuple[dict, torch.Tensor]:
    """Tokens/s of whole generations, the median of `runs` after one warm-up (which compiles and captures), and that
    run's split: prefill_ms, the time to the first token (the prefill, which generate ends with a host sync on
    its finiteness check); decode_ms_per_token, the rest per later token; host_ms_per_token, how long the host took to
    queue each of those steps (were it as long as decode_ms_per_token, the host would be the bottleneck)."""
    results, seq = [], None
    for r in range(runs + 1):
        seq, times = timed_generate(model, prompt, new_tokens, decode_fn=decode_fn, prefill_fn=prefill_fn,
                                    temperature=0.8, top_k=200)
        n = seq.shape[1] - prompt.numel()
        if r:
            results.append({"tok_s": n / times["total"], "prefill_ms": 1e3 * times["to_first"],
                            "decode_ms_per_token": 1e3 * (times["total"] - times["to_first"]) / (n - 1),
                            "host_ms_per_token": 1e3 * (times["queued"] - times["to_first"]) / (n - 1)})
    return sorted(results, key=lambda x: x["tok_s"])[len(results) // 2], seq


def timing_line(timing: dict) -> str:
    """time_decode's split, for the progress print."""
    return (f"prefill {timing['prefill_ms']:.1f} ms, then {timing['decode_ms_per_token']:.3f} ms per token "
            f"(host {timing['host_ms_per_token']:.3f})")


SPARSE_KERNEL = "_sparse_gemv_kernel"
PERSISTENT_KERNEL = "_decode_layers_kernel"
CATS_KERNEL = "_cats_gate_up_kernel"
LAYER_ORDER = ("qkv", "o", "gate/up", "down")  # sparse launches per block, in forward order
CATS_LAYER_ORDER = ("down",)  # a CATS block's one sparse GEMV launch (its gate/up is the CATS kernel)


def category(name: str) -> str:
    """Kernel name -> part of the decode step. Inductor names its kernels (triton_*) after the ops they fuse:
    its matrix products ("mm": dense GEMVs, and the LM head fused with the final norm) form one group."""
    n = name.lower()
    if SPARSE_KERNEL in name:
        return "sparse_gemv"
    if PERSISTENT_KERNEL in name:
        return "persistent (all decoder layers)"
    if CATS_KERNEL in name:
        return "cats gate/up"
    if not n.startswith("triton_"):
        if "nccl" in n or "allreduce" in n or "all_reduce" in n:
            return "allreduce"
        if any(s in n for s in ("gemv", "gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")):
            return "cublas"
    if any(s in n for s in ("topk", "sort", "argmax", "exponential", "radix")):
        return "sampling"
    # Before the attention names: inductor names a GEMV after the ops fused into it, the decode_attention its
    # output feeds included.
    if "_mm_" in n:
        return "inductor mm"
    if any(s in n for s in ("sdpa", "flash", "attention", "softmax", "bmm", "amax")):
        return "attention"
    if "rsqrt" in n:
        return "norm"
    return "other"


@torch.no_grad()
def profile_steps(model, decode_fn, prompt_len: int, steps: int = 20, layer_order=LAYER_ORDER) -> dict:
    """Kernel time per decode step by category (the same captured graphs the timing used), the step time
    from CUDA events, and what is left between them: launch gaps and idle time."""
    from torch.profiler import ProfilerActivity, profile
    token = torch.zeros(1, 1, dtype=torch.int, device="cuda")
    pos = torch.tensor([prompt_len], dtype=torch.int, device="cuda")
    for _ in range(3):
        token = decode_fn(model, token, pos, temperature=0.8, top_k=200).clone()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        a.record()
        for _ in range(steps):
            token = decode_fn(model, token, pos, temperature=0.8, top_k=200).clone()
        b.record()
        torch.cuda.synchronize()
    step_ms = a.elapsed_time(b) / steps
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    out, by_name, sparse_i = {}, {}, 0
    for e in kernels:
        c = category(e.name)
        if c == "sparse_gemv":
            c = f"sparse_gemv {layer_order[sparse_i % len(layer_order)]}"
            sparse_i += 1
        ms = e.time_range.elapsed_us() / 1e3 / steps
        out[c] = out.get(c, 0.0) + ms
        name = c if c.startswith("sparse_gemv") else e.name[:90]
        total_ms, count = by_name.get(name, (0.0, 0))
        by_name[name] = (total_ms + ms, count + 1 / steps)
    total = sum(out.values())
    # the kernels that take the most time per step, with how many launches and the mean time of one
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {"step_ms": step_ms, "kernels_ms": total, "gaps_ms": step_ms - total,
            "kernels_per_step": len(kernels) / steps, "by_category_ms": out,
            "top_kernels": [{"name": n, "ms_per_step": ms, "launches_per_step": cnt, "us_each": 1e3 * ms / cnt}
                            for n, (ms, cnt) in top]}


@torch.no_grad()
def host_costs(model, decode_fn, prompt_len: int, calls: int = 100, layers=None) -> dict:
    """The host's share of a decode step: call_ms, the median host time of one compiled call made with the GPU idle
    (dynamo's guard check, the CUDA-graph tree's bookkeeping and the graph launch); guard_us, the guard check alone
    (of the compiled entry that accepts this model, timed through dynamo's cache-entry debug API, best of 5)."""
    token = torch.zeros(1, 1, dtype=torch.int, device="cuda")
    pos = torch.tensor([prompt_len], dtype=torch.int, device="cuda")
    kwargs = {"temperature": 0.8, "top_k": 200}
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t = time.perf_counter()
        decode_fn(model, token, pos, **kwargs)
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    frame = {"model": model, "x": token, "input_pos": pos, "sampling_kwargs": kwargs}  # decode_one_token's locals
    code = decode_one_token.__code__
    if layers is not None:  # the persistent step (generate.decode_one_token_persistent) and its stacked layers
        frame["layers"], code = layers, decode_one_token_persistent.__code__
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)
    guards = next((e.guard_manager for e in entries if e.guard_manager.check(frame)), None)
    if guards is None:  # the frame as rebuilt here is not the one dynamo guarded: leave the guard time out
        return {"call_ms": 1e3 * sorted(times)[calls // 2], "guard_us": None}
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            guards.check(frame)
        best = min(best, (time.perf_counter() - t) / calls)
    return {"call_ms": 1e3 * sorted(times)[calls // 2], "guard_us": 1e6 * best}


@torch.no_grad()
def profile_prefill(model, prompt, prefill_fn=prefill) -> dict:
    """One prefill of the prompt as generate runs it: host and GPU time, the GPU's kernel time, and the host
    ops and kernels that take the most of each (the prefill is part of every tokens/s figure)."""
    from torch.profiler import ProfilerActivity, profile
    pos = torch.arange(prompt.numel(), device=prompt.device)
    prefill_fn(model, prompt.view(1, -1), pos, temperature=0.8, top_k=200)  # caches are set up: warm
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        a.record()
        prefill_fn(model, prompt.view(1, -1), pos, temperature=0.8, top_k=200)
        b.record()
        torch.cuda.synchronize()
        host_ms = 1e3 * (time.perf_counter() - t)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    by_kernel = {}
    for e in kernels:
        ms, n = by_kernel.get(e.name[:90], (0.0, 0))
        by_kernel[e.name[:90]] = (ms + e.time_range.elapsed_us() / 1e3, n + 1)
    return {"host_ms": host_ms, "gpu_ms": a.elapsed_time(b), "kernels": len(kernels),
            "kernels_ms": sum(ms for ms, _ in by_kernel.values()),
            "top_kernels": [{"name": k, "ms": ms, "launches": n}
                            for k, (ms, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:8]],
            "top_host_ops": [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                             for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]]}


def allreduce_us(dim: int, dtype, n: int = 64) -> float:
    """One decode all-reduce ([1, 1, dim]) as the model runs it, captured in a CUDA graph: median per call. One-shot
    (tp.ONE_SHOT on): the norm that runs it, AllReduceRMSNorm, whose one kernel also adds the residual and normalises;
    NCCL: funcol.all_reduce alone."""
    from torch.distributed import _functional_collectives as funcol
    x = torch.randn(1, 1, dim, dtype=dtype, device="cuda")
    # the residual stream is the same on every rank (NCCL's path adds it on rank 0 only)
    residual = torch.randn(1, 1, dim, dtype=dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    world = dist.get_world_size()
    nccl = funcol.all_reduce(x, "sum", dist.group.WORLD).wait()
    norm = AllReduceRMSNorm(dim).to("cuda", dtype)
    # the one-shot norm against NCCL's sum and model.RMSNorm: the same inputs added in another order, each of the
    # world adds rounding to dtype, so the sums may differ by a few roundings of the largest (a missing or doubled
    # rank's input is off by about |x|); the normalised values by as many of theirs
    ref_normed, ref_h = RMSNorm(dim).to("cuda", dtype)(nccl, residual)
    normed, h = norm(x, residual)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=world * torch.finfo(dtype).eps * float(ref_h.abs().max()))
    torch.testing.assert_close(normed, ref_normed, rtol=0,
                               atol=world * torch.finfo(dtype).eps * float(ref_normed.abs().max()))

    def calls(count):
        for _ in range(count):
            if tp.ONE_SHOT:
                norm(x, residual)
            else:
                y = funcol.all_reduce(x, "sum", dist.group.WORLD)
        if not tp.ONE_SHOT:  # NCCL's result: wait on the last, so the capture ends with it
            funcol.wait_tensor(y)

    calls(3)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            calls(n)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(times)[len(times) // 2]


@user_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(CONFIGS), help="named config with random weights")
    p.add_argument("--checkpoint_path", type=Path, help="a converted checkpoint (uses its threshold file)")
    p.add_argument("--sparsities", type=fraction(0, MAX_SPARSITY), nargs="+", default=list(SPARSITIES))
    p.add_argument("--mode", default="uniform", choices=MODES,
                   help="threshold allocation of the sparse model (cats: CATS's MLP-only sparsity)")
    p.add_argument("--cats_sparsities", type=fraction(0, MAX_SPARSITY), nargs="*", default=[],
                   help="after the --mode rows, a CATS model in the same process at these MLP sparsities")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt_tokens", type=positive_int, default=5)
    p.add_argument("--new_tokens", type=positive_int, default=200)
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--sparse_kernel", default="predicated", choices=list(SPARSE_KERNELS),
                   help="kernel variant: every layer predicated or compact, or compact for gate/up (and down) only")
    p.add_argument("--int8", action="store_true", help="the sparse model's seven projections in int8 (per-output-channel "
                   "scales); the dense baseline stays in --dtype. Output decode-<model>-int8...")
    add_int4_args(p)  # the sparse model's projections in 4 bits; output decode-<model>-int4-g<group size>...
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                   help="programmatic dependent launch (Hopper+) for the sparse kernel and inductor's kernels")
    p.add_argument("--coordinate_descent", action=argparse.BooleanOptionalAction, default=True,
                   help="inductor's coordinate-descent tuning of its own kernels (GPT-Fast's setting)")
    p.add_argument("--one_shot_allreduce", action=argparse.BooleanOptionalAction, default=None,
                   help="tensor parallel: one-shot all-reduces over symmetric memory (else NCCL's); default: "
                        "NCCL for the dense model, one-shot for the sparse one, each one's faster choice")
    p.add_argument("--compile_prefill", action="store_true",
                   help="compile the prefill of both models too (generate.py --compile_prefill), where the protocol's "
                        "prefill is eager as GPT-Fast's; shortens the time to the first token")
    p.add_argument("--dict_tags", action=argparse.BooleanOptionalAction, default=True,
                   help="dynamo's recursive dict tags for guards (generate.py's setting): skip the guards of modules "
                        "whose __dict__ is unchanged since the compiled entry's first call")
    p.add_argument("--engines", nargs="+", default=["per-layer"], choices=["per-layer", "persistent"],
                   help="decode steps to time on the TEAL-sparse model at each sparsity (generate.py --engine): a kernel "
                        "per layer and projection, and/or every decoder layer in one persistent kernel (one GPU)")
    p.add_argument("--persistent_programs", type=int, default=0,
                   help="persistent grid (0: every program the GPU holds at once, up to 4 per SM)")
    p.add_argument("--persistent_tile_kb", type=positive_int, default=64,
                   help="persistent kernel: weight KB per GEMV tile")
    p.add_argument("--persistent_warps", type=positive_int, default=4, help="persistent kernel: warps per program")
    p.add_argument("--persistent_max_registers", type=int, default=MAX_REGISTERS,
                   help="persistent kernel: register cap per thread (0: the compiler's choice)")
    p.add_argument("--persistent_grouped_strip", type=int, default=GROUPED_STRIP, choices=(32, 64, 128, 256, 512),
                   help="persistent kernel: columns per GEMV strip of --int4 / GGUF-quantized weights")
    p.add_argument("--persistent_stages", type=positive_int, default=STAGES,
                   help="persistent kernel: software-pipelining depth of the GEMV tiles' row loop")
    p.add_argument("--persistent_block_rows", type=positive_int, default=BLOCK_ROWS,
                   help="persistent kernel: rows of bf16/int8 weights an iteration of the GEMV tiles' row loop")
    p.add_argument("--tag", default="", help="suffix of the output name, so a new run keeps the old file")
    p.add_argument("--out", type=Path, default=Path("benchmark/results"))
    a = p.parse_args(argv)
    int4 = int4_quant(a)
    set_pdl(a.pdl)
    torch._dynamo.config.use_recursive_dict_tags_for_guards = a.dict_tags
    one_shot = {"dense": bool(a.one_shot_allreduce), "sparse": a.one_shot_allreduce is not False}
    torch._inductor.config.coordinate_descent_tuning = a.coordinate_descent
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py measures GPU decode and needs CUDA")
    if (a.mode == "cats" or a.cats_sparsities) and (a.int8 or int4):
        raise SystemExit("CATS rows keep the model's weight dtype; drop --int8 / --int4")
    rank = maybe_init_dist()
    if rank is not None and int4:
        raise SystemExit("tensor parallelism does not shard group-wise quantized weights; run --int4 on one GPU")
    if rank is not None and (a.mode == "cats" or a.cats_sparsities):
        raise SystemExit("CATS runs on one GPU; tensor parallelism shards TEAL's layers only")
    world = dist.get_world_size() if rank is not None else 1
    if "persistent" in a.engines and (rank is not None or a.mode == "cats"):
        raise SystemExit("--engines persistent runs TEAL's layers on one GPU: no tensor parallel or CATS")
    dtype = getattr(torch, a.dtype)
    device = f"cuda:{rank or 0}"
    torch.cuda.set_device(device)
    counters = torch._dynamo.utils.counters

    def build(sparse: bool, cats: bool = False):
        if a.checkpoint_path:
            from generate import load_sparse_model
            m, tf = load_sparse_model(a.checkpoint_path, device, dtype, 0.0 if not sparse else 0.5,
                                      "cats" if cats else a.mode, None, a.sparse_kernel, a.int8 and sparse,
                                      int4 if sparse else None)
            if rank is not None:
                apply_tp(m)
            return m, tf
        shard = (lambda m: apply_tp(m, rank, world)) if rank is not None else None
        m = random_model(a.model, device=device, dtype=dtype, shard=shard)
        if sparse and cats:
            return catsify(m), None
        return (sparsify(m, compact=SPARSE_KERNELS[a.sparse_kernel], int8=a.int8, group_quant=int4) if sparse else m), None

    gen = torch.Generator().manual_seed(0)
    rows = []
    copy_GBps = copy_bandwidth()  # before any model takes memory
    set_one_shot(one_shot["dense"])
    model, _ = build(sparse=False)
    dim, n_layer = model.config.dim, model.config.n_layer
    prompt = torch.randint(0, model.config.vocab_size, (a.prompt_tokens,), generator=gen).to(device)
    sizes = weight_bytes(model)
    dense_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True) if a.compile_prefill else prefill
    timing, _ = time_decode(model, dense_fn, prompt, a.new_tokens, a.runs, prefill_fn)
    tok_s = timing["tok_s"]
    rows.append({"sparsity": 0.0, "mode": "dense", "engine": "per-layer", "dtype": a.dtype, **timing,
                 "ms_per_token": 1e3 / tok_s, "realized_sparsity": 0.0, "bytes_per_token": sizes["total"], "dense_equiv_GBps": sizes["total"] * tok_s / 1e9,
                 "profile": profile_steps(model, dense_fn, a.prompt_tokens),
                 "host": host_costs(model, dense_fn, a.prompt_tokens),
                 "prefill": profile_prefill(model, prompt, prefill_fn)})
    if rank in (None, 0):
        print(f"dense: {tok_s:.1f} tok/s ({sizes['total'] * tok_s / 1e9:.0f} GB/s), {timing_line(timing)}", flush=True)
        print(json.dumps({k: rows[-1][k] for k in ("profile", "host", "prefill")}, indent=1), flush=True)
    del model, dense_fn
    torch._dynamo.reset()
    torch.cuda.empty_cache()

    set_one_shot(one_shot["sparse"])
    recompiles = 0

    def time_sparse(cats: bool, sparsities) -> None:
        """Rows for one sparse model (TEAL's or CATS's) at each sparsity; adds its recompilations on sparsity change."""
        nonlocal recompiles
        mode = "cats" if cats else a.mode
        model, tf = build(sparse=True, cats=cats)
        sizes = weight_bytes(model)  # of the sparse model: "sparse" counts the bytes its kernels may skip
        table = None if tf else (calibrate_cats_on_random_prefill if cats else calibrate_on_random_prefill)(
            model, sparsities)
        # The calibration prefill left 512-position caches; decode over caches of the dense run's size, as it did
        # (a longer cache makes the attention kernel split its reads and launch a combine kernel).
        model.setup_caches(1, a.prompt_tokens + a.new_tokens, exact=True)
        fns = {"per-layer": torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)}
        layers = None
        engines = ["per-layer"] if cats else a.engines
        if "persistent" in engines:  # stacks the layers' tensors; the per-layer path then reads the same (views)
            layers = persistent_layers(model, a.persistent_programs, tile_bytes=a.persistent_tile_kb << 10,
                                       num_warps=a.persistent_warps, max_registers=a.persistent_max_registers,
                                       grouped_strip=a.persistent_grouped_strip, stages=a.persistent_stages,
                                       block_rows=a.persistent_block_rows)
            fns["persistent"] = torch.compile(functools.partial(decode_one_token_persistent, layers=layers),
                                              mode="reduce-overhead", fullgraph=True)
        frames_before = None

        def use_sparsity(m, s):
            if tf is not None:
                from thresholds.file import apply_thresholds
                apply_thresholds(m, tf, s, mode)
            elif cats:
                set_cats_thresholds(m, table[s])
            else:
                set_uniform(m, table[s])

        seqs, first = [], len(rows)
        for s in sparsities:
            use_sparsity(model, s)
            for engine in engines:
                fn = fns[engine]
                timing, seq = time_decode(model, fn, prompt, a.new_tokens, a.runs, prefill_fn)
                seqs.append(seq)
                tok_s = timing["tok_s"]
                row = {"sparsity": s, "mode": mode if tf or cats else "uniform", "engine": engine, "dtype": a.dtype,
                       **timing, "ms_per_token": 1e3 / tok_s, "dense_equiv_GBps": sizes["total"] * tok_s / 1e9,
                       "profile": profile_steps(model, fn, a.prompt_tokens,
                                                layer_order=CATS_LAYER_ORDER if cats else LAYER_ORDER),
                       "host": host_costs(model, fn, a.prompt_tokens,
                                          layers=layers if engine == "persistent" else None)}
                if engine == "persistent":  # where the kernel's time goes, by phase (its own timers, one eager step)
                    layers.check()
                    pos = torch.tensor([a.prompt_tokens], dtype=torch.int, device=device)
                    token, embedding = persistent_embedding(model, prompt[:1].view(1, 1).int())
                    row["phases"] = layers.profile(token, pos, model.freqs_cis, embedding, model.k_caches,
                                                   model.v_caches)
                else:
                    row["prefill"] = profile_prefill(model, prompt, prefill_fn)
                rows.append(row)
                if rank in (None, 0):
                    print(f"{mode} {engine} {s:.2f}: {tok_s:.1f} tok/s, {tok_s / rows[0]['tok_s']:.2f}x dense, "
                          f"{timing_line(timing)}", flush=True)
                    print(json.dumps({k: row[k] for k in ("profile", "host", "prefill", "phases") if k in row},
                                     indent=1), flush=True)
            if frames_before is None:  # every engine compiled once
                frames_before = counters["stats"]["unique_graphs"]
        recompiles += counters["stats"]["unique_graphs"] - frames_before
        # Measured after every timing: the measurement's hooks and flags change the layers' __dict__s, after which
        # dynamo no longer skips their guards (recursive dict tags) and every later compiled call checks them all.
        for seq, row in zip(seqs, rows[first:]):
            use_sparsity(model, row["sparsity"])
            real = measure_realized_sparsity(model, seq, a.prompt_tokens)
            moved = sizes["total"] - sizes["sparse"] + real["sparse_bytes_moved"]  # per GPU, like dense_equiv
            row.update(realized_sparsity=real["model"], mlp_sparsity=real["mlp"], moved_GBps=moved * row["tok_s"] / 1e9,
                       bytes_per_token=moved)
            if rank in (None, 0):
                print(f"{mode} {row['engine']} {row['sparsity']:.2f}: realised {real['model']:.3f} model-wide, "
                      f"{real['mlp']:.3f} MLP", flush=True)
        del model, fns, layers
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    time_sparse(a.mode == "cats", a.sparsities)
    if a.cats_sparsities:
        time_sparse(True, a.cats_sparsities)
    ar = {}  # microseconds per all-reduce, for each kind the run used
    if rank is not None:
        for on in sorted(set(one_shot.values())):
            set_one_shot(on)
            ar["one-shot" if on else "nccl"] = allreduce_us(dim, dtype)
    for r in rows:
        r["speedup_vs_dense"] = r["tok_s"] / rows[0]["tok_s"]
        r["decode_speedup_vs_dense"] = rows[0]["decode_ms_per_token"] / r["decode_ms_per_token"]
        # the bytes a decode token reads (weights: the kept rows of the sparse layers, all others) at the decode
        # step's rate, against what a device-to-device copy reaches in this run
        r["share_of_copy_bandwidth"] = r["bytes_per_token"] / (r["decode_ms_per_token"] / 1e3) / (copy_GBps * 1e9)
        if rank is not None:
            r["tp"] = world
            r["allreduce"] = "one-shot" if one_shot["dense" if r["mode"] == "dense" else "sparse"] else "nccl"
            r["allreduce_share"] = 2 * n_layer * ar[r["allreduce"]] * 1e-6 * r["tok_s"]
    shutdown_dist()
    if rank not in (None, 0):
        return
    props = torch.cuda.get_device_properties(0)
    name = a.checkpoint_path.name if a.checkpoint_path else a.model
    result = {"device": props.name, "model": name, "weights": "checkpoint" if a.checkpoint_path else "random",
              "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "batch_size": 1, "runs": a.runs,
              "compile": "reduce-overhead", "compile_prefill": a.compile_prefill,
              "recompiles_on_sparsity_change": recompiles, "sparse_kernel": a.sparse_kernel, "int8": a.int8,
              "int4": {"group_size": a.group_size, "zero_point": a.zero_point} if a.int4 else None,
              "pdl": a.pdl, "coordinate_descent": a.coordinate_descent, "dict_tags": a.dict_tags, "tp": world,
              "allreduce_us": ar, "weight_bytes": sizes["total"], "copy_GBps": copy_GBps, "engines": a.engines,
              "persistent": {"programs": a.persistent_programs, "tile_kb": a.persistent_tile_kb,
                             "warps": a.persistent_warps, "max_registers": a.persistent_max_registers,
                             "grouped_strip": a.persistent_grouped_strip, "stages": a.persistent_stages,
                             "block_rows": a.persistent_block_rows},
              "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = ((f"tp-{name}" if rank is not None else f"decode-{name}") + ("-int8" if a.int8 else "")
            + (f"-int4-g{a.group_size}" + ("" if a.zero_point else "-sym") if a.int4 else "") + a.tag)
    path = a.out / f"{stem}-{props.name.replace(' ', '-')}{f'-tp{world}' if rank is not None else ''}.json"
    write_result(result, path, plot)
    print(f"recompilations on sparsity change: {recompiles}; wrote {path}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    dense = rows[0]
    sparse = rows[1:]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, engine in dict.fromkeys((r["mode"], r.get("engine", "per-layer")) for r in sparse):
        rs = [r for r in sparse if r["mode"] == mode and r.get("engine", "per-layer") == engine]
        label = "CATS (MLP only)" if mode == "cats" else f"TEAL {mode}, {engine}"
        ax.plot([r["realized_sparsity"] for r in rs], [r["tok_s"] for r in rs], "o-", label=label)
    ax.axhline(dense["tok_s"], color="gray", ls="--", label=f"dense {dense['tok_s']:.0f} tok/s")
    ax.set_xlabel("realised activation sparsity (model-wide, parameter-weighted)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{result['model']} decode, {result['device']}" + (f", TP{result['tp']}" if result["tp"] > 1 else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    main()
