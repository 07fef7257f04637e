"""Sparse GEMV for TEAL decoding: the `teal::sparse_gemv`, `teal::sparse_gemv_partials` and `teal::cats_gate_up` ops
(ops.py), with their Triton kernels (kernels.py, grouped.py, cats.py), which ops.py imports where it launches one."""
from sparse_gemv.ops import (MAX_TOKENS, add_partials, cats_gate_up, cats_gate_up_reference, check_inputs, sparse_gemv,
                             sparse_gemv_partials, sparse_gemv_reference)

__all__ = ["MAX_TOKENS", "add_partials", "cats_gate_up", "cats_gate_up_reference", "check_inputs", "sparse_gemv",
           "sparse_gemv_partials", "sparse_gemv_reference"]
