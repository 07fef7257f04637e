"""Compile every Triton kernel launch the project makes for given GPU architectures, with no GPU: run as a script
with the interpreter off (`TRITON_INTERPRET=0 python tests/compile_launches.py 80 86 90`). It calls the real
launchers on CPU tensors, with each kernel swapped for a recorder and the device queries the launchers make (SM
count, shared memory, programmatic dependent launch) answering as the architecture's GPU would, so the launches are
exactly the ones the code makes there; Triton then builds each for that architecture through ptxas. Prints one JSON
object per launch: what was launched, whether it compiled, the shared memory it needs against the architecture's
limit, how many programmatic-dependent-launch instructions (griddepcontrol, Hopper+) its PTX holds, its registers and
stack bytes a thread, and its local-memory loads and stores.
test_kernels.py runs it to check that the kernels build for Ampere (A100 sm_80, A6000 sm_86) as well as Hopper."""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

import tp
from sparse_gemv import attention_kernel, cats, grouped, kernels, one_shot_all_reduce, persistent

# SM count and shared memory a block may use (bytes), as the CUDA driver reports them: A100, A6000, H100 (SXM)
GPUS = {80: (108, 166912), 86: (84, 101376), 90: (132, 232448)}
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.uint8: "u8",
          torch.int32: "i32", torch.int64: "i64"}


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it;
    `kernel.warmup(...)` (the persistent launcher's residency check) answers with a kernel of no registers and no
    shared memory, so that check passes and the launch after it is recorded."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        from types import SimpleNamespace
        return SimpleNamespace(n_regs=32, metadata=SimpleNamespace(shared=0, num_warps=kwargs.get("num_warps", 4)),
                               _init_handles=lambda: None)


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_launch(kernel, args, kwargs, capability: int):
    """Build one recorded launch for sm_<capability>, its arguments specialized as Triton's launcher specializes them
    at run time (pointers and integers on 16 bytes marked divisible, integers equal to 1 made constants): without
    that no load vectorizes, and the build is not the code the GPU runs."""
    bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constants[p.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":  # an integer equal to 1
            signature[p.name], constants[p.name] = "constexpr", key
        else:
            signature[p.name] = arg_type(value)
            if key:  # "D": divisible by 16
                attrs[(i,)] = CUDABackend.parse_attr(key)
    options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
               **({"maxnreg": kwargs["maxnreg"]} if "maxnreg" in kwargs else {})}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", capability, 32),
                          options=options)


def sparse_gemv_launches():
    """(description, call) for the sparse GEMV: the Llama-3-8B decode shapes, predicated and compact, one token and
    four, every weight dtype, per-channel thresholds, and partial sums returned instead of reduced."""
    shapes = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate/up": (4096, (14336, 14336)),
              "down": (14336, (4096,))}
    cases = []
    for name, (k, splits) in shapes.items():
        for compact in (False, True):
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int8):
                for tokens in (1, 4):
                    cases.append((name, k, splits, compact, dtype, tokens, False, True))
        cases.append((name, k, splits, False, torch.bfloat16, 1, True, True))  # per-channel thresholds
        cases.append((name, k, splits, False, torch.bfloat16, 1, False, False))  # partial sums to the reader
    for name, k, splits, compact, dtype, tokens, per_channel, reduce in cases:
        n = sum(splits)
        int8 = dtype == torch.int8
        act = torch.bfloat16 if int8 else dtype
        x = torch.zeros(tokens, k, dtype=act)
        weight = torch.empty(k, n, dtype=dtype)
        thresholds = torch.zeros((len(splits), k) if per_channel else (len(splits),))
        description = (f"sparse_gemv {name} {'compact' if compact else 'predicated'} {str(dtype)[6:]} T={tokens}"
                       + (" per-channel" if per_channel else "") + ("" if reduce else " partials"))
        yield description, lambda x=x, w=weight, t=thresholds, s=splits, c=compact, r=reduce, i8=int8: (
            kernels.sparse_gemv_triton(x, w, t, s, compact=c, reduce=r, scales=torch.ones(w.shape[1]) if i8 else None))


def grouped_sparse_gemv_launches():
    """(description, call) for the group-wise quantized sparse GEMV at the Llama-3-8B decode shapes: 4-bit with zero
    points in groups of 128 (--int4) and 8-bit in groups of 32 (GGUF Q8_0, the tiles of any 32-row group); predicated
    and compact, one token and four; per-channel thresholds and partial sums at the gate/up shape only (flags that
    change no tile, while a one-token launch, its tile loop unrolled over 16-byte slabs, takes seconds to build)."""
    shapes = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate/up": (4096, (14336, 14336)),
              "down": (14336, (4096,))}
    formats = [(4, 128, True), (8, 32, False)]
    for name, (k, splits) in shapes.items():
        n = sum(splits)
        for bits, group_size, zero_point in formats:
            weight = torch.empty(k, n // 2, dtype=torch.uint8) if bits == 4 else torch.empty(k, n, dtype=torch.int8)
            scales = torch.empty(-(-k // group_size), n, dtype=torch.float16)
            zeros = torch.empty_like(scales) if zero_point else None
            cases = [(compact, tokens, False, True) for compact in (False, True) for tokens in (1, 4)]
            if name == "gate/up":
                cases += [(False, 1, True, True), (False, 1, False, False)]  # per-channel thresholds; partial sums
            for compact, tokens, per_channel, reduce in cases:
                x = torch.zeros(tokens, k, dtype=torch.bfloat16)
                thresholds = torch.zeros((len(splits), k) if per_channel else (len(splits),))
                description = (f"grouped_sparse_gemv {name} {bits}-bit g{group_size}{' zeros' if zero_point else ''} "
                               f"{'compact' if compact else 'predicated'} T={tokens}"
                               + (" per-channel" if per_channel else "") + ("" if reduce else " partials"))
                yield description, lambda x=x, w=weight, s=scales, z=zeros, g=group_size, t=thresholds, sp=splits, \
                    c=compact, r=reduce: grouped.grouped_sparse_gemv_triton(x, w, s, z, g, t, sp, c, r)


def lm_head_launches():
    """A GGUF's LM head kept quantized (its tied token embedding's table, or an untied output.weight) through the
    grouped kernel at threshold 0, one token: Llama-3-8B's head (4096 -> 128256), Q8_0, Q4_1 and Q4_0 (groups of 32),
    where no K split pays (a grid of strips alone fills the GPU) and the launch writes y directly."""
    k, n = 4096, 128256
    for bits, zero_point in ((8, False), (4, True), (4, False)):
        weight = torch.empty(k, n // 2, dtype=torch.uint8) if bits == 4 else torch.empty(k, n, dtype=torch.int8)
        scales = torch.empty(k // 32, n, dtype=torch.float16)
        zeros = torch.empty_like(scales) if zero_point else None
        name = {(8, False): "Q8_0", (4, True): "Q4_1", (4, False): "Q4_0"}[bits, zero_point]
        yield f"lm_head {name} T=1", lambda x=torch.zeros(1, k, dtype=torch.bfloat16), w=weight, s=scales, z=zeros: (
            grouped.grouped_sparse_gemv_triton(x, w, s, z, 32, torch.zeros(1), (n,)))


def attention_launches():
    """Llama-3-8B heads (32 query, 8 KV, head dim 128), a cache long enough to split, bf16 and fp16, q/k/v whole
    or as a sparse projection's fp32 partial sums."""
    for dtype in (torch.bfloat16, torch.float16):
        for parts in (0, 2):
            row = (1, 1, (32 + 2 * 8) * 128)
            qkv = torch.zeros((parts, *row), dtype=torch.float32) if parts else torch.zeros(row, dtype=dtype)
            caches = [torch.zeros(1, 8, 8192, 128, dtype=dtype) for _ in range(2)]
            freqs = torch.zeros(1, 64, 2, dtype=dtype)
            pos = torch.tensor([5000])
            yield (f"decode_attention {str(dtype)[6:]}" + (f" {parts} partial sums" if parts else ""),
                   lambda q=qkv, c=caches, f=freqs, p=pos: attention_kernel.decode_attention_triton(q, f, c[0], c[1],
                                                                                                    p))


def cats_launches():
    """CATS's gate/up kernel at Llama-3-8B's MLP (4096 -> 2 x 14336), in every activation dtype, one and four tokens."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tokens in (1, 4):
            x, w13 = torch.zeros(tokens, 4096, dtype=dtype), torch.zeros(2 * 14336, 4096, dtype=dtype)
            yield (f"cats_gate_up {str(dtype)[6:]} {tokens} token(s)",
                   lambda x=x, w=w13: cats.cats_gate_up_triton(x, w, torch.zeros(1)))


def all_reduce_launches():
    """The one-shot all-reduce + RMSNorm of tensor-parallel decoding: Llama-3-70B width, 2 to 8 ranks."""
    for world in (2, 4, 8):
        x = torch.zeros(1, 8192, dtype=torch.bfloat16)
        bases = torch.zeros(world, dtype=torch.int64)
        yield (f"one_shot_all_reduce_rmsnorm world={world}",
               lambda x=x, b=bases: tp.launch_one_shot_all_reduce_rmsnorm(x, x, x[0], 1e-5, b, 1 << 16, 0))


def persistent_launches():
    """The persistent decode kernel at Llama-3-8B's layer shapes (two layers; the layer count is a loop bound): bf16
    weights with per-tensor thresholds, int8 with per-channel ones, and group-wise quantized ones: 4-bit with zero
    points in groups of 128 (--int4), 4-bit in groups of 32 without zero points (GGUF Q4_0) and 8-bit in groups of 32
    (GGUF Q8_0); and the variants of the new families in bf16: Qwen2.5-7B's shapes with q/k/v biases, Qwen3-8B's with
    q/k norms."""
    llama3, qwen25, qwen3 = (4096, 32, 8, 128, 14336), (3584, 28, 4, 128, 18944), (4096, 32, 8, 128, 12288)
    # name, shapes, stored weight dtype, (bits, group size, zero points) of group-wise weights, per-channel
    # thresholds, q/k/v biases, q/k norms
    cases = [("bf16", llama3, torch.bfloat16, None, False, False, False),
             ("int8 per-channel", llama3, torch.int8, None, True, False, False),
             ("4-bit g128 zeros", llama3, torch.uint8, (4, 128, True), False, False, False),
             ("4-bit g32", llama3, torch.uint8, (4, 32, False), False, False, False),
             ("8-bit g32", llama3, torch.int8, (8, 32, False), False, False, False),
             ("qwen2.5-7b bf16 q/k/v biases", qwen25, torch.bfloat16, None, False, True, False),
             ("qwen3-8b bf16 q/k norms", qwen3, torch.bfloat16, None, False, False, True)]
    layers = 2
    for name, (dim, heads, kv_heads, head_dim, inter), dtype, quant, per_channel, bias, qk_norm in cases:
        bits, group_size, zero_point = quant or (0, 0, False)
        nqkv = (heads + 2 * kv_heads) * head_dim
        shapes = [(dim, nqkv), (heads * head_dim, dim), (dim, 2 * inter), (inter, dim)]
        weights = [torch.empty(layers, k, n // (2 if bits == 4 else 1), dtype=dtype) for k, n in shapes]
        # as generate.persistent_layers stacks them: each layer's thresholds padded to 16 bytes
        thresholds = [torch.zeros((layers, g, k) if per_channel else (layers, 4))[:, :g]
                      for g, (k, _) in zip((3, 1, 2, 1), shapes)]
        if group_size:
            scales = [torch.ones(layers, -(-k // group_size), n, dtype=torch.float16) for k, n in shapes]
        else:
            scales = [torch.ones(layers, n) for _, n in shapes] if dtype == torch.int8 else []
        zeros = [torch.zeros_like(s) for s in scales] if zero_point else []
        caches = [torch.zeros(layers, 1, kv_heads, 256, head_dim, dtype=torch.bfloat16) for _ in range(2)]
        args = (torch.zeros(1, 1, dtype=torch.int32), torch.tensor([7]), torch.zeros(256, head_dim // 2, 2),
                torch.zeros(1000, dim, dtype=torch.bfloat16), torch.zeros(layers, 2, dim, dtype=torch.bfloat16),
                weights, thresholds, scales, zeros, group_size, *caches, torch.zeros(1, dtype=torch.int32), 1e-5, 0,
                False)
        family = dict(qkv_biases=torch.zeros(layers, nqkv, dtype=torch.bfloat16) if bias else None,
                      qk_norm_weights=torch.ones(layers, 2, head_dim, dtype=torch.bfloat16) if qk_norm else None)
        yield f"decode_layers {name}", lambda args=args, family=family: persistent.launch(*args, **family)


def build_resources(compiled) -> dict:
    """Registers a thread, stack bytes a thread, and the local-memory loads and stores in the SASS (register spills,
    mostly) of a build, from its cubin by the cuobjdump Triton ships; {} where it ships none or cannot read it."""
    tool = os.path.join(os.path.dirname(sys.modules[CUDABackend.__module__].__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        try:
            usage, sass = [subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout
                           for flag in ("-res-usage", "-sass")]
        except (OSError, subprocess.CalledProcessError):
            return {}
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if not found:
        return {}
    return {"registers": int(found[1]), "stack": int(found[2]), "local_loads": len(re.findall(r"\bLDL\b", sass)),
            "local_stores": len(re.findall(r"\bSTL\b", sass))}


def main(capabilities: list[int]) -> None:
    recorders = {}
    for module, name in ((kernels, "_sparse_gemv_kernel"), (grouped, "_grouped_sparse_gemv_kernel"),
                         (attention_kernel, "_decode_attention_kernel"),
                         (attention_kernel, "_attention_combine_kernel"),
                         (one_shot_all_reduce, "_one_shot_all_reduce_rmsnorm_kernel"),
                         (persistent, "_decode_layers_kernel"), (cats, "_cats_gate_up_kernel")):
        recorders[name] = Recorder(getattr(module, name))
        setattr(module, name, recorders[name])
    for capability in capabilities:
        sms, max_shared = GPUS[capability]
        kernels._sm_count = lambda device: sms
        kernels._max_shared = lambda device: max_shared
        kernels._has_pdl = lambda device: capability >= 90
        persistent._index = lambda device: 0
        persistent._device_limits = lambda index: (sms, 65536, max_shared + 1024, 2048)
        for description, call in [*sparse_gemv_launches(), *grouped_sparse_gemv_launches(), *lm_head_launches(),
                                  *attention_launches(),
                                  *cats_launches(), *all_reduce_launches(), *persistent_launches()]:
            for recorder in recorders.values():
                recorder.launches.clear()
            call()
            for kernel, args, kwargs in (launch for r in recorders.values() for launch in r.launches):
                result = {"launch": description, "kernel": kernel.__name__, "capability": capability,
                          "pdl": kwargs.get("launch_pdl", False), "max_shared": max_shared}
                try:
                    compiled = compile_launch(kernel, args, kwargs, capability)
                    result.update(ok=True, shared=compiled.metadata.shared,
                                  griddepcontrol=compiled.asm["ptx"].count("griddepcontrol"),
                                  **build_resources(compiled))
                except Exception as e:  # reported per launch, so one failure does not hide the others
                    result.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or list(GPUS))
