"""Block-sparse flash attention driven by a Selection (block tables + element masks from positions):
Pallas (Triton) forward and backward kernels, an XLA gather path for CPU, a dense reference."""

from kernels.sparse_attention.api import attend, resolve_implementation  # noqa: F401
from kernels.sparse_attention.pallas_triton import PallasConfig  # noqa: F401
from kernels.sparse_attention.selection import Selection, transpose_tables, with_transpose  # noqa: F401
