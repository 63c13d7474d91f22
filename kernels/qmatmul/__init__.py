"""Block-scaled quantized matmul (NVFP4, MXFP8, MXFP4), its tensor types and the fused quantize."""

from kernels.qmatmul.api import last_implementation, qmatmul  # noqa: F401
from kernels.qmatmul.config import MatmulConfig, QuantizeConfig  # noqa: F401
from kernels.qmatmul.packed import PackedQTensor, pack  # noqa: F401
from kernels.qmatmul.qtensor import QTensor, dequantize, pack_e2m1, unpack_e2m1  # noqa: F401
from kernels.qmatmul.quantize_pallas import quantize  # noqa: F401
