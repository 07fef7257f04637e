"""Sparse GEMV for TEAL decoding: Triton kernels (kernels.py) behind the `teal::sparse_gemv` and
`teal::sparse_gemv_partials` ops (ops.py); CATS's gate/up stage behind `teal::cats_gate_up` (cats.py)."""
from sparse_gemv.cats import cats_gate_up, cats_gate_up_reference, cats_gate_up_triton
from sparse_gemv.kernels import MAX_TOKENS, sparse_gemv_triton
from sparse_gemv.ops import add_partials, check_inputs, sparse_gemv, sparse_gemv_partials, sparse_gemv_reference

__all__ = ["MAX_TOKENS", "add_partials", "cats_gate_up", "cats_gate_up_reference", "cats_gate_up_triton",
           "check_inputs", "sparse_gemv", "sparse_gemv_partials", "sparse_gemv_reference", "sparse_gemv_triton"]
