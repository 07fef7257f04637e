"""The one-shot all-reduce + RMSNorm kernel of tensor-parallel decoding, behind `teal::one_shot_all_reduce_rmsnorm`
(tp.py, which owns the symmetric buffers and the flag layout)."""
import triton
import triton.language as tl


@triton.jit
def _one_shot_all_reduce_rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, normed_ptr, h_ptr, bases_ptr, rows, dim,
                                        slot_numel, eps, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                                        MAX_W: tl.constexpr, CALL_COUNT_AT: tl.constexpr):
    """h = residual + the sum of every rank's x, normed = RMSNorm(h) * weight, one program per row (token), so the
    norm's sum of squares stays in the program. Every rank's symmetric buffer holds two input slots and a flag area
    after them. Program i copies its rows of x into this call's slot, adds one to its arrival count at every peer
    (release), waits for one arrival from every peer and takes it (acquire), then sums its rows of every rank's slot
    in rank order in fp32, adds the residual and rounds once, so every rank gets the same bits. Calls alternate slots
    by a per-program call count, so a rank rewrites a slot only two calls later, after the barrier of the call between
    has shown that every peer finished reading it: one barrier per call, where torch's one_shot_all_reduce_copy waits
    on a second one at its end before the buffer may be reused. Calls of any row count are safe because row r always
    belongs to program r % ONE_SHOT_PROGRAMS (fewer programs run only when there are fewer rows), so only program i of
    any rank ever writes or reads its slot entries."""
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    base = tl.multiple_of(tl.load(bases_ptr + RANK).to(tl.pointer_type(dtype)), 16)  # allocations start aligned
    flags = (base + 2 * slot_numel).to(tl.pointer_type(tl.int32))
    calls = tl.load(flags + CALL_COUNT_AT + pid)
    slot = tl.multiple_of((calls % 2) * slot_numel, 16)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < dim
    for row in range(pid, rows, tl.num_programs(0)):
        offs = row * dim + cols
        tl.store(base + slot + offs, tl.load(x_ptr + offs, mask=col_mask), mask=col_mask)
    tl.debug_barrier()  # the program's copy is complete before any peer is told so
    for p in tl.static_range(WORLD):
        if p != RANK:
            peer_base = tl.load(bases_ptr + p).to(tl.pointer_type(dtype))
            peer_flags = (peer_base + 2 * slot_numel).to(tl.pointer_type(tl.int32))
            tl.atomic_add(peer_flags + pid * MAX_W + RANK, 1, sem="release", scope="sys")
    for p in tl.static_range(WORLD):
        if p != RANK:
            while tl.atomic_add(flags + pid * MAX_W + p, 0, sem="acquire", scope="sys") == 0:
                pass
            tl.atomic_add(flags + pid * MAX_W + p, -1, sem="relaxed", scope="sys")
    tl.debug_barrier()  # every peer's slot is complete before any thread reads it
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    for row in range(pid, rows, tl.num_programs(0)):
        offs = row * dim + cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(WORLD):
            peer = tl.multiple_of(tl.load(bases_ptr + p).to(tl.pointer_type(dtype)), 16)
            acc += tl.load(peer + slot + offs, mask=col_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        h = (acc + tl.load(residual_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(h_ptr + offs, h, mask=col_mask)
        hf = h.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt_rn(tl.sum(hf * hf, axis=0) / dim + eps)
        # rounded as model.RMSNorm rounds: the normalised value to the model dtype, then its product with the weight
        normed = ((hf * inv_rms).to(dtype).to(tl.float32) * weight).to(dtype)
        tl.store(normed_ptr + offs, normed, mask=col_mask)
    tl.store(flags + CALL_COUNT_AT + pid, calls + 1)
