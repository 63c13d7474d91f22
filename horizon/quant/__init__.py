"""Low-precision training numerics: block-scaled formats (NVFP4, MXFP8, MXFP4, FP8), the random
Hadamard transform, stochastic rounding, per-GEMM recipes and the quantized linear dot
("Pretraining Large Language Models with NVFP4", NVIDIA, 2025)."""

from horizon.quant.dot import quantized_dot  # noqa: F401
from horizon.quant.formats import (  # noqa: F401
    FORMATS,
    NonFiniteError,
    dequantize,
    nonfinite_count,
    quantize,
)
from horizon.quant.hadamard import hadamard_matrix, rht  # noqa: F401
from horizon.quant.recipe import (  # noqa: F401
    PRESETS,
    GemmQuant,
    KeepRule,
    LinearRecipe,
    OperandQuant,
    QuantRecipe,
    check_rules,
    get_recipe,
    high_precision_active,
    resolve,
)
from horizon.quant.rounding import DGRAD, FPROP, WGRAD, gemm_key, layer_key  # noqa: F401
from kernels.qmatmul.qtensor import QTensor  # noqa: F401
