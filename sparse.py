"""TEAL sparsity as a property of the layer.

`sparsify(model)` swaps each linear layer of every block for a `SparseLinear` (the way GPT-Fast swaps
in quantized linears). A SparseLinear owns its weight in the kernel's layout ([K, N], input channels
as rows) and a float32 threshold buffer; decode steps go through the `teal::sparse_gemv` op, prefill
multiplies densely by the same storage. Thresholds are data: `set_thresholds` copies new values into
the buffers, so a compiled model picks up a new sparsity without recompiling.

With int8=True the layer stores its weight as int8 with one fp32 scale per output channel (weight-only quantization,
as GPT-Fast's int8 mode): half the bytes of bf16, with the same rows skipped. With a GroupQuant it stores group-wise
quantized weights (4-bit, or 8-bit as GGUF's Q8_0) with fp16 scales, and optionally zeros, per group of input rows and
output channel, in sparse_gemv/grouped.py's layout: a quarter of the bytes of bf16 at 4 bits, scales included.
A checkpoint that keeps a GGUF's quantized token embedding and LM head (convert_hf_checkpoint.py --keep_quantization)
loads them as a QuantizedEmbedding and a SparseLinear head at threshold 0 of the same format (load_quantized_layers).

Under torch.compile, layers whose reader can add up the kernel's fp32 partial products over slices of K
(teal::sparse_gemv_partials) leave that split-K reduction to it, so the sparse kernel ends after one store:
o and down feed a norm that adds their output to the residual stream (model.RMSNorm), and return the sum of the
partials as a graph expression, which inductor computes inside that norm's kernel; q/k/v hand the partials to
teal::decode_attention, which adds them as it loads the token's q, k and v. A q/k/v projection with biases (Qwen2) or
whose q and k are normalised before RoPE (Qwen3) returns its partials summed in the graph instead ("add"): inductor adds
them inside the kernel that adds the bias or normalises.

A layer with a bias thresholds its input as without one and adds the bias to the product.

`catsify(model)` swaps in CATS instead (Lee et al., 2024): only the MLP is sparse. A CatsFeedForward thresholds
SiLU(x W_gate^T) per layer, computes only the kept channels of up (teal::cats_gate_up) and hands the product to a
SparseLinear down projection with threshold 0, which skips the rows of its zero inputs. Attention stays dense.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_gemv import MAX_TOKENS, add_partials  # importing the package registers the torch.ops.teal ops
from sparse_gemv.cpu import sparse_gemv_rows
from sparse_gemv.ops import skips_rows_on_cpu
from sparse_gemv.quant import GROUP_SIZES, dequantize_columns, dequantize_grouped, grouped_matmul, pack_int4

# The seven thresholded projections, grouped by the layer (and input) they share.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
LAYER_GROUPS = {"attention.wqkv": ("q", "k", "v"), "attention.wo": ("o",),
                "feed_forward.w13": ("gate", "up"), "feed_forward.w2": ("down",)}
# Who adds up each layer's split-K partial sums in a compiled decode step (SparseLinear.decode_partials): o and down
# feed a norm, q/k/v the attention op; gate/up keep the kernel's reduction (it does not split their K on an H100).
DECODE_PARTIALS = {"attention.wqkv": "keep", "attention.wo": "sum", "feed_forward.w13": "reduce",
                   "feed_forward.w2": "sum"}


@dataclass(frozen=True)
class GroupQuant:
    """Group-wise weight-only quantization: `bits` (4, or 8) per weight, one fp16 scale per group of `group_size`
    input channels and output channel, and with zero_point an fp16 zero (the weight of q = 0) beside it."""
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8) or self.group_size not in GROUP_SIZES or (self.bits == 8 and self.zero_point):
            raise ValueError(f"group-wise quantization is 4-bit (with or without zero points) or symmetric 8-bit in "
                             f"groups of {GROUP_SIZES}, not {self}")


def frozen(t: torch.Tensor) -> nn.Parameter:
    """A layer tensor that is not trained: a parameter without gradient (see SparseLinear.__init__)."""
    return nn.Parameter(t, requires_grad=False)


def grouped_tensors(in_features: int, out_features: int, quant: GroupQuant, device=None):
    """A group-wise quantized weight's frozen tensors in sparse_gemv/grouped.py's layout, to be filled: weight_t
    ([in_features, out_features / 2] uint8 at 4 bits, [in_features, out_features] int8 at 8), fp16 scales and zeros
    (None without zero points) [ceil(in_features / group_size), out_features]."""
    groups = -(-in_features // quant.group_size)
    weight_t = torch.empty(in_features, out_features // 2, device=device, dtype=torch.uint8) if quant.bits == 4 else \
        torch.empty(in_features, out_features, device=device, dtype=torch.int8)
    zeros = frozen(torch.zeros(groups, out_features, device=device, dtype=torch.float16)) if quant.zero_point else None
    return frozen(weight_t), frozen(torch.ones(groups, out_features, device=device, dtype=torch.float16)), zeros


class SparseLinear(nn.Module):
    """y = x W^T where, for single-token steps, inputs with |x| <= threshold are dropped with their weight rows.

    Columns are split into groups (q/k/v or gate/up) that each have their own threshold. Thresholds are
    [groups] (one per projection) or [groups, in_features] (per channel, for weight-aware thresholds).
    """

    def __init__(self, in_features: int, out_features: int, split_sizes, per_channel: bool = False,
                 compact: bool = False, int8: bool = False, bias: bool = False, device=None, dtype=None,
                 group_quant: GroupQuant | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # The layer's tensors are frozen parameters and its Python attributes immutable values (a tuple, not a list),
        # so that torch.compile's guards can skip the whole layer while its __dict__ is unchanged (generate.py turns
        # on recursive dict tags): dynamo gives buffers an aliasing guard, under which their module's guards run in
        # full on every call.
        self.split_sizes = tuple(int(s) for s in split_sizes)
        self.compact = compact  # kernel variant: list kept rows first (pays off above about 70% sparsity)
        # Group-wise quantized weights (group_size > 0): weight_t, scales and zeros in sparse_gemv/grouped.py's layout.
        self.group_size, self.zeros = 0, None
        if group_quant is not None:
            self.group_size = group_quant.group_size
            self.weight_t, self.scales, self.zeros = grouped_tensors(in_features, out_features, group_quant, device)
        else:
            self.weight_t = frozen(torch.empty(in_features, out_features, device=device,
                                               dtype=torch.int8 if int8 else dtype))
            # int8 weights: W = weight_t.T * scales[:, None], one scale per output channel (None: weights in the
            # model dtype)
            self.scales = frozen(torch.ones(out_features, device=device, dtype=torch.float32)) if int8 else None
        self.bias = frozen(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        shape = (len(self.split_sizes), in_features) if per_channel else (len(self.split_sizes),)
        self.thresholds = frozen(torch.zeros(shape, device=device, dtype=torch.float32))
        # Perplexity and sparsity measurement mask multi-token inputs too (decode semantics, one pass).
        self.mask_prefill = False
        # How a compiled single-token step returns the product, set by sparsify (eager steps always take "reduce",
        # since there the sum would be kernels of its own):
        #   "reduce": the kernel adds its split-K partial sums and writes y in x's dtype;
        #   "sum": the fp32 sum of the partials as a graph expression, which inductor computes inside the norm that
        #          reads it (o and down; not row-sharded layers, tp.py, whose output goes to an all-reduce);
        #   "keep": the partials themselves, [SPLIT_K, ..., out_features] fp32, which teal::decode_attention adds
        #           (q/k/v);
        #   "add": their sum in x's dtype as a graph expression, for readers that are graph ops (q/k/v of models with
        #          q/k biases or norms, which inductor fuses into one kernel with the sum).
        self.decode_partials = "reduce"

    @classmethod
    def from_linear(cls, linear: nn.Linear, split_sizes, per_channel: bool = False, compact: bool = False,
                    int8: bool = False, group_quant: GroupQuant | None = None) -> "SparseLinear":
        w = linear.weight
        layer = cls(w.shape[1], w.shape[0], split_sizes, per_channel, compact, int8, linear.bias is not None,
                    device=w.device, dtype=w.dtype, group_quant=group_quant)
        if linear.bias is not None:
            layer.bias = frozen(linear.bias.detach().clone())
        if group_quant is not None:
            q, scales, zeros = quantize_groupwise(w.detach(), group_quant)
            layer.weight_t, layer.scales = frozen(q), frozen(scales)
            layer.zeros = None if zeros is None else frozen(zeros)
        elif int8:
            q, scales = quantize_int8(w.detach())
            layer.weight_t, layer.scales = frozen(q.t().contiguous()), frozen(scales)
        else:
            layer.weight_t = frozen(w.detach().t().contiguous())
        layer.reserve_workspace()
        return layer

    def reserve_workspace(self, device: torch.device | None = None) -> None:
        """The kernels' workspace on this layer's GPU, before any CUDA-graph capture (kernels.reserve_workspace);
        device: the one its weights will be loaded to, for a layer still on the meta device."""
        device = self.weight_t.device if device is None else device
        if device.type == "cuda":
            from sparse_gemv.grouped import workspace_rows
            from sparse_gemv.kernels import reserve_workspace
            rows = workspace_rows(self.in_features, self.group_size) if self.group_size else self.in_features
            reserve_workspace(device, rows, self.out_features)

    @property
    def per_channel(self) -> bool:
        return self.thresholds.dim() == 2

    @property
    def int8(self) -> bool:
        """int8 weights with one scale per output channel (group-wise formats: group_quant)."""
        return self.scales is not None and not self.group_size

    @property
    def group_quant(self) -> GroupQuant | None:
        if not self.group_size:
            return None
        return GroupQuant(4 if self.weight_t.dtype == torch.uint8 else 8, self.group_size, self.zeros is not None)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The [K, N] weight this layer multiplies by, in dtype (quantized weights dequantized)."""
        if self.group_size:
            return dequantize_grouped(self.weight_t, self.scales, self.zeros, self.group_size, dtype)
        if self.int8:
            return self.weight_t.to(dtype) * self.scales.to(dtype)
        return self.weight_t.to(dtype)

    def row_bytes(self, columns: int) -> float:
        """Bytes a kept input row moves for `columns` output channels, its share of the groups' scales and zeros
        included."""
        if not self.group_size:
            return columns * self.weight_t.element_size()
        per_weight = (4 if self.weight_t.dtype == torch.uint8 else 8) / 8
        return columns * (per_weight + (2 if self.zeros is None else 4) / self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In x's dtype, except in a compiled decode step of a layer that leaves its partial sums to the reader
        (decode_partials): there their fp32 sum ("sum"), or the partials themselves ("keep"). The bias, if any, is
        added to the product ("keep" takes none)."""
        if x.shape[-2] == 1 or self.mask_prefill:
            rows = x.reshape(-1, self.in_features)
            if not torch.compiler.is_compiling() and skips_rows_on_cpu(rows, self.scales):
                # eager CPU decoding: the row-skipping product without the op's dispatch and checks, a cost per layer
                y = sparse_gemv_rows(rows, self.weight_t, self.thresholds, self.split_sizes, self.scales, self.zeros,
                                     self.group_size)
                return self._add_bias(y.view(*x.shape[:-1], self.out_features))
            tokens = rows.shape[0]  # above MAX_TOKENS the ops multiply densely: no partials to save
            # "keep" only for single-token steps: the reader that adds them is the decode step's attention op
            leave = self.decode_partials in ("sum", "add") or (self.decode_partials == "keep" and x.shape[-2] == 1)
            if leave and tokens <= MAX_TOKENS and torch.compiler.is_compiling():
                parts = torch.ops.teal.sparse_gemv_partials(rows, self.weight_t, self.thresholds, self.split_sizes,
                                                            self.compact, self.scales, self.zeros, self.group_size)
                if self.decode_partials == "keep":
                    if self.bias is not None:
                        raise ValueError("a layer with a bias cannot leave its partial sums to the attention op")
                    return parts.view(parts.shape[0], *x.shape[:-1], self.out_features)
                y = add_partials(parts, torch.float32 if self.decode_partials == "sum" else x.dtype)
                return self._add_bias(y.view(*x.shape[:-1], self.out_features))
            y = torch.ops.teal.sparse_gemv(rows, self.weight_t, self.thresholds, self.split_sizes, self.compact,
                                           self.scales, self.zeros, self.group_size)
            return self._add_bias(y.view(*x.shape[:-1], self.out_features))
        if self.group_size and x.device.type == "cpu":  # prefill: dequantize on the fly, a slab at a time
            return self._add_bias(grouped_matmul(x, self.weight_t, self.scales, self.zeros, self.group_size))
        if self.group_size:
            return self._add_bias(x @ self.dense_weight(x.dtype))
        if self.int8:  # prefill: dequantize on the fly, as GPT-Fast's int8 linear does
            return self._add_bias((x @ self.weight_t.to(x.dtype)) * self.scales.to(x.dtype))
        return self._add_bias(x @ self.weight_t)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, groups={self.split_sizes}, "
                f"per_channel={self.per_channel}, compact={self.compact}, int8={self.int8}, "
                f"bias={self.bias is not None}" + (f", {self.group_quant}" if self.group_size else ""))


class QuantizedEmbedding(nn.Module):
    """nn.Embedding over a group-wise quantized table: a GGUF's Q8_0 (or Q4_0 / Q4_1) token embedding kept by
    convert_hf_checkpoint.py --keep_quantization. The table is stored as the LM head multiplies by it, [dim, vocab] in
    grouped.py's layout (groups along dim, the head's input), so a tied model keeps one copy for both; a lookup
    dequantizes only the rows it returns, into dtype (the activations')."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_quant: GroupQuant, dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.group_size = group_quant.group_size
        self.weight_t, self.scales, self.zeros = grouped_tensors(embedding_dim, num_embeddings, group_quant, device)

    @property
    def group_quant(self) -> GroupQuant:
        return GroupQuant(4 if self.weight_t.dtype == torch.uint8 else 8, self.group_size, self.zeros is not None)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = dequantize_columns(self.weight_t, self.scales, self.zeros, self.group_size, idx.reshape(-1), self.dtype)
        return rows.view(*idx.shape, self.embedding_dim)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.group_quant}, dtype={self.dtype}"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight [N, K] ~= q * scales[:, None], q in [-127, 127], scales fp32 [N].
    A channel's scale maps its largest |weight| to 127 (1 for an all-zero channel)."""
    amax = weight.abs().amax(dim=1).float()
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(weight.float() / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_groupwise(weight: torch.Tensor, quant: GroupQuant) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor | None]:
    """Round-to-nearest group-wise quantization of weight [N, K] into sparse_gemv/grouped.py's layout: (weights
    [K, N / 2] uint8 at 4 bits or [K, N] int8 at 8, fp16 scales [ceil(K / group_size), N], fp16 zeros or None).
    With zero points a group's 16 levels span its minimum to its maximum (scale (max - min) / 15, zero min); without,
    4 bits are scale * (q - 8) with scale max|w| / 7, 8 bits scale * q with scale max|w| / 127. Scales and zeros are
    rounded to fp16 first and the weights quantized against the rounded values; an all-equal group gets scale 1."""
    n, k = weight.shape
    groups = -(-k // quant.group_size)
    w = weight.detach().float().t().contiguous()  # [K, N]
    padded = torch.nn.functional.pad(w, (0, 0, 0, groups * quant.group_size - k), value=float("nan"))
    grouped = padded.view(groups, quant.group_size, n)
    if quant.zero_point:
        low = grouped.nan_to_num(nan=float("inf")).amin(dim=1)
        high = grouped.nan_to_num(nan=float("-inf")).amax(dim=1)
        scales, zeros = (high - low) / 15, low.half()
    else:
        scales, zeros = grouped.nan_to_num(nan=0.0).abs().amax(dim=1) / (7 if quant.bits == 4 else 127), None
    scales = scales.half()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    per_row = scales.float().repeat_interleave(quant.group_size, dim=0)[:k]
    if zeros is not None:
        q = torch.round((w - zeros.float().repeat_interleave(quant.group_size, dim=0)[:k]) / per_row).clamp(0, 15)
        return pack_int4(q), scales, zeros
    if quant.bits == 4:
        return pack_int4(torch.round(w / per_row).clamp(-8, 7) + 8), scales, None
    return torch.round(w / per_row).clamp(-127, 127).to(torch.int8), scales, None


def sparse_layers(model: nn.Module):
    """Yield (layer index, attribute path, SparseLinear) for every sparse layer, in forward order."""
    for i, block in enumerate(model.layers):
        for path in LAYER_GROUPS:
            owner, attr = path.split(".")
            layer = getattr(getattr(block, owner), attr)
            if isinstance(layer, SparseLinear):
                yield i, path, layer


def layer_splits(block: nn.Module) -> dict:
    """The sparse layers of a block (LAYER_GROUPS paths) and their output groups (None: one group)."""
    return {"attention.wqkv": block.attention.qkv_sizes, "attention.wo": None,
            "feed_forward.w13": (block.feed_forward.intermediate_size,) * 2, "feed_forward.w2": None}


QUANTIZED_TENSORS = ("weight_t", "scales", "zeros")


def decode_partials_in(block: nn.Module, layer: SparseLinear, wanted: str) -> str:
    """The decode_partials a layer of block takes: "keep" becomes "add" where q/k/v go through a bias add or norms
    before the attention op."""
    if wanted == "keep" and (layer.bias is not None or block.attention.q_norm is not None):
        return "add"
    return wanted


def stored_quant(state: dict, prefix: str, group_size: int, in_features: int, out_features: int) -> GroupQuant:
    """The format of a weight a checkpoint stores quantized (prefix + weight_t, scales, zeros: sparse_gemv/grouped.py's
    layout), its tensors checked against it: the file is untrusted, and a wrong tensor would fail only at the first
    step."""
    weight_t = state[prefix + "weight_t"]
    bits = {torch.uint8: 4, torch.int8: 8}.get(weight_t.dtype)
    if bits is None:
        raise ValueError(f"{prefix}weight_t is {weight_t.dtype}; a quantized layer stores uint8 (4-bit) or int8 "
                         "(8-bit)")
    quant = GroupQuant(bits, group_size, prefix + "zeros" in state)
    if out_features % (32 // bits):  # the kernels read whole int32 words of columns
        raise ValueError(f"{prefix}weight_t: {bits}-bit weights need outputs in multiples of {32 // bits}, got "
                         f"{out_features}; convert without --keep_quantization")
    for name, want in zip(QUANTIZED_TENSORS, grouped_tensors(in_features, out_features, quant, "meta")):
        got = state.get(prefix + name)
        if want is not None and (got is None or got.dtype != want.dtype or got.shape != want.shape):
            raise ValueError(f"{prefix + name} is {'missing' if got is None else f'{got.dtype} {tuple(got.shape)}'}, "
                             f"but a {quant.bits}-bit layer of {in_features} inputs and {out_features} outputs in "
                             f"groups of {group_size} stores {want.dtype} {tuple(want.shape)}")
    return quant


def load_quantized_layers(model: nn.Module, state: dict, group_size: int, dtype: torch.dtype) -> None:
    """For a checkpoint that stores weights quantized (convert_hf_checkpoint.py --keep_quantization: a layer's
    weight_t, fp16 scales and zeros in sparse_gemv/grouped.py's layout instead of its weight), swap layers of that
    format into the model (built on the meta device, before load_state_dict(assign=True)): SparseLinear projections,
    a QuantizedEmbedding (its lookups in dtype) and an LM head that is a SparseLinear at threshold 0, dense (a tied
    model's takes the embedding's tensors, which load_model then ties); their thresholds (0: dense) are added to
    state."""
    for i, block in enumerate(model.layers):
        for path, split in layer_splits(block).items():
            prefix = f"layers.{i}.{path}."
            if prefix + "weight_t" not in state:
                continue
            owner, attr = path.split(".")
            parent = getattr(block, owner)
            linear = getattr(parent, attr)
            quant = stored_quant(state, prefix, group_size, linear.in_features, linear.out_features)
            sparse = SparseLinear(linear.in_features, linear.out_features, split or (linear.out_features,),
                                  bias=prefix + "bias" in state, device="meta", group_quant=quant)
            sparse.decode_partials = decode_partials_in(block, sparse, DECODE_PARTIALS[path])
            setattr(parent, attr, sparse)
            state[prefix + "thresholds"] = torch.zeros_like(sparse.thresholds, device=state[prefix + "weight_t"].device)
            sparse.reserve_workspace(state[prefix + "weight_t"].device)
    model.layers[-1].feed_forward.w2.decode_partials = "reduce"
    vocab, dim = model.config.vocab_size, model.config.dim
    if "tok_embeddings.weight_t" in state:
        quant = stored_quant(state, "tok_embeddings.", group_size, dim, vocab)
        model.tok_embeddings = QuantizedEmbedding(vocab, dim, quant, dtype, device="meta")
        if model.config.tie_embeddings:
            state.update({"output." + k.split(".")[1]: v for k, v in state.items() if k.startswith("tok_embeddings.")})
    if "output.weight_t" in state:
        quant = stored_quant(state, "output.", group_size, dim, vocab)
        model.output = SparseLinear(dim, vocab, (vocab,), device="meta", group_quant=quant)
        state["output.thresholds"] = torch.zeros_like(model.output.thresholds, device=state["output.weight_t"].device)
        model.output.reserve_workspace(state["output.weight_t"].device)


def sparsify(model: nn.Module, per_channel: bool = False, compact=(), int8: bool = False,
             group_quant: GroupQuant | None = None) -> nn.Module:
    """Replace the q/k/v, o, gate/up and down linears of every block with SparseLinear (thresholds 0: dense).
    compact: the layers (LAYER_GROUPS paths, e.g. "feed_forward.w2") that take the kernel variant for high sparsity
    (see sparse_gemv/kernels.py), or True / False for all or none; int8 stores the weights as int8 with
    per-output-channel scales, group_quant quantizes them group-wise (round to nearest). Layers that are sparse already
    (a quantized checkpoint's, load_quantized_layers) keep their weights and take the threshold kind and kernel
    variant asked for, as long as no thresholds were set."""
    if isinstance(compact, bool):  # every layer or none
        compact = tuple(LAYER_GROUPS) if compact else ()
    elif isinstance(compact, str):
        compact = (compact,)
    unknown = set(compact) - set(LAYER_GROUPS)
    if unknown:
        raise ValueError(f"compact names layers {sorted(unknown)}; the sparse layers are {list(LAYER_GROUPS)}")
    for block in model.layers:
        for path, split in layer_splits(block).items():
            owner, attr = path.split(".")
            parent = getattr(block, owner)
            layer = getattr(parent, attr)
            if isinstance(layer, SparseLinear):
                if (layer.int8 != int8 or group_quant not in (None, layer.group_quant)
                        or layer.per_channel != per_channel and bool(layer.thresholds.any())):
                    raise ValueError("model is already sparse with another threshold kind or weight format; "
                                     "sparsify a fresh model")
                if layer.per_channel != per_channel:
                    shape = (len(layer.split_sizes), layer.in_features) if per_channel else (len(layer.split_sizes),)
                    layer.thresholds = frozen(layer.thresholds.new_zeros(shape))
                layer.compact = path in compact
                continue
            sparse = SparseLinear.from_linear(layer, split or (layer.out_features,), per_channel, path in compact, int8,
                                              group_quant)
            # tp.py marks row-sharded layers, whose output goes to an all-reduce, "reduce"
            sparse.decode_partials = decode_partials_in(block, sparse, getattr(layer, "decode_partials",
                                                                               DECODE_PARTIALS[path]))
            setattr(parent, attr, sparse)
    # The last down projection's output goes to the final norm, which inductor fuses into the LM head's matmul,
    # where partial sums would be re-added in every tile of the head.
    model.layers[-1].feed_forward.w2.decode_partials = "reduce"
    return model


def set_thresholds(model: nn.Module, table: torch.Tensor) -> None:
    """Copy thresholds into every sparse layer.

    table: [n_layer, 7] (one per projection, in PROJECTIONS order) or, for per-channel layers,
    a dict {(layer, projection): tensor [in_features]} / the same [n_layer, 7] table, broadcast.
    """
    with torch.no_grad():
        for i, path, layer in sparse_layers(model):
            for g, proj in enumerate(LAYER_GROUPS[path]):
                value = table[(i, proj)] if isinstance(table, dict) else table[i, PROJECTIONS.index(proj)]
                value = torch.as_tensor(value, dtype=torch.float32)
                if layer.per_channel and value.dim() == 1 and value.numel() != layer.in_features:
                    raise ValueError(f"layer {i} {proj}: {value.numel()} channel thresholds for {layer.in_features} inputs")
                layer.thresholds[g].copy_(value)


def column_norms(layer: SparseLinear) -> list[torch.Tensor]:
    """||W_p[:, i]||_2 for each projection p of the layer: the weight-aware score of input channel i."""
    out, col = [], 0
    for n in layer.split_sizes:
        out.append(layer.dense_weight(torch.float32)[:, col:col + n].norm(dim=1))
        col += n
    return out


def set_mask_prefill(model: nn.Module, value: bool) -> None:
    for _, _, layer in sparse_layers(model):
        layer.mask_prefill = value
    for block in model.layers:
        if isinstance(block.feed_forward, CatsFeedForward):
            block.feed_forward.mask_prefill = value


class CatsFeedForward(nn.Module):
    """CATS's MLP: y = W_down (a' * x W_up^T), a' = a * 1[|a| > threshold], a = SiLU(x W_gate^T).

    Owns the layouts its kernels read: w13 [2I, D], gate then up by output channel (a kept up channel is one
    contiguous row), and the down projection as a SparseLinear ([I, D], by input channel) with threshold 0, whose
    kernel skips the rows where a' is zero. Decode steps (and masked prefills, mask_prefill) go through
    teal::cats_gate_up; a prefill computes the MLP densely, as TEAL's does. The threshold is data: a frozen [1]."""

    def __init__(self, w13: torch.Tensor, down: "SparseLinear"):
        super().__init__()
        self.intermediate_size = w13.shape[0] // 2
        self.w13 = frozen(w13.detach().contiguous())
        self.w2 = down
        self.threshold = frozen(torch.zeros(1, device=w13.device, dtype=torch.float32))
        self.mask_prefill = False

    @classmethod
    def from_feed_forward(cls, ff: nn.Module) -> "CatsFeedForward":
        down = SparseLinear.from_linear(ff.w2, (ff.w2.out_features,))
        down.decode_partials = DECODE_PARTIALS["feed_forward.w2"]
        return cls(ff.w13.weight, down)

    def gate_activation(self, x: torch.Tensor) -> torch.Tensor:
        """a = SiLU(x W_gate^T), dense: what the threshold is compared against (calibration reads it)."""
        return F.silu(F.linear(x, self.w13[:self.intermediate_size]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == 1 or self.mask_prefill:
            h = torch.ops.teal.cats_gate_up(x.reshape(-1, x.shape[-1]), self.w13, self.threshold)
            h = h.view(*x.shape[:-1], self.intermediate_size)
        else:
            gate, up = F.linear(x, self.w13).split(self.intermediate_size, dim=-1)
            h = F.silu(gate) * up
        return self.w2(h)


def catsify(model: nn.Module) -> nn.Module:
    """Replace every block's MLP with a CatsFeedForward (threshold 0: dense); attention stays as it is."""
    for block in model.layers:
        if isinstance(block.feed_forward, CatsFeedForward):
            continue
        if isinstance(block.feed_forward.w13, SparseLinear):
            raise ValueError("model is already TEAL-sparse; catsify a fresh model")
        block.feed_forward = CatsFeedForward.from_feed_forward(block.feed_forward)
    model.layers[-1].feed_forward.w2.decode_partials = "reduce"  # as sparsify's last down projection
    return model


def cats_layers(model: nn.Module):
    """Yield (layer index, CatsFeedForward) for every CATS MLP, in forward order."""
    for i, block in enumerate(model.layers):
        if isinstance(block.feed_forward, CatsFeedForward):
            yield i, block.feed_forward


def set_cats_thresholds(model: nn.Module, thresholds: torch.Tensor) -> None:
    """thresholds: [n_layer], one per CATS MLP, on |SiLU(x W_gate^T)|."""
    layers = list(cats_layers(model))
    if len(layers) != len(model.layers) or thresholds.numel() != len(layers):
        raise ValueError(f"{thresholds.numel()} CATS thresholds for a model with {len(layers)} CATS MLPs in "
                         f"{len(model.layers)} blocks; catsify the model first")
    with torch.no_grad():
        for i, ff in layers:
            ff.threshold.fill_(float(thresholds[i]))


def projection_params(block: nn.Module) -> dict:
    """{projection: weight count} of one block's seven projections, whatever layer holds them."""
    dim, inter = block.attention.wo.out_features, block.feed_forward.intermediate_size
    params = {p: n * dim for p, n in zip(("q", "k", "v"), block.attention.qkv_sizes)}
    params.update(o=dim * block.attention.wo.in_features, gate=inter * dim, up=inter * dim, down=dim * inter)
    return params


class SparsityMeter:
    """Counts, per projection, the fraction of inputs at or under threshold; reports the
    parameter-weighted model-wide activation sparsity over all seven projections of every block (those no layer
    thresholds count as dense: CATS's attention and gate). Forward pre-hooks; no change to the forward.
    With several sequences in a batch it also counts the weight rows a step skips (skipped_fraction): those whose
    input is under threshold in every sequence at that position.
    In a CATS MLP, up skips the rows whose product down then skips (h = a' * up is zero where a' is), so up is
    counted with down's count."""

    def __init__(self, model: nn.Module):
        self.masked = {}  # (layer, projection) -> [masked count, total count]
        self.skipped = {}  # (layer, projection) -> [rows under threshold in every sequence, rows]
        self.params = {(i, p): n for i, block in enumerate(model.layers) for p, n in projection_params(block).items()}
        self.handles = []
        for i, path, layer in sparse_layers(model):
            self.handles.append(layer.register_forward_pre_hook(self._hook(i, path, layer)))
        for i, ff in cats_layers(model):
            self.masked[(i, "up")] = self.masked.setdefault((i, "down"), [0, 0])
            self.skipped[(i, "up")] = self.skipped.setdefault((i, "down"), [0, 0])

    def _hook(self, i, path, layer):
        def hook(module, args):
            x = args[0]
            if x.shape[-2] != 1 and not module.mask_prefill:
                return
            x = x.abs().float().reshape(-1, *x.shape[-2:])  # [sequences, positions, K]
            for g, proj in enumerate(LAYER_GROUPS[path]):
                under = x <= module.thresholds[g]
                masked, skipped = torch.stack([under.sum(), under.all(0).sum()]).tolist()  # one host sync
                c = self.masked.setdefault((i, proj), [0, 0])
                c[0] += masked
                c[1] += under.numel()
                r = self.skipped.setdefault((i, proj), [0, 0])
                r[0] += skipped
                r[1] += under[0].numel()
        return hook

    def per_projection(self) -> dict:
        return {k: m / t for k, (m, t) in self.masked.items() if t}

    def skipped_fraction(self) -> dict:
        """Per projection, the fraction of weight rows the kernel skips: per_projection's for one sequence, less
        for a batch."""
        return {k: m / t for k, (m, t) in self.skipped.items() if t}

    def model_sparsity(self, projections=PROJECTIONS) -> float:
        """Parameter-weighted over `projections` of every block (default all seven)."""
        fr = self.per_projection()
        total = sum(n for (_, p), n in self.params.items() if p in projections)
        return sum(fr.get(k, 0.0) * n for k, n in self.params.items() if k[1] in projections) / total

    def mlp_sparsity(self) -> float:
        """Parameter-weighted over the MLP's gate, up and down."""
        return self.model_sparsity(("gate", "up", "down"))

    def close(self):
        for h in self.handles:
            h.remove()
