"""Implementation choice shared by the kernel APIs: None picks Pallas on a GPU (or when
interpret=True), the XLA path elsewhere; an unknown name is a KernelInputError."""

from __future__ import annotations

import jax

from kernels.errors import KernelInputError

IMPLEMENTATIONS = ("pallas", "xla", "reference")


def resolve_implementation(op: str, implementation: str | None, interpret: bool = False, *,
                           pallas_ok: bool = True) -> str:
    """The implementation `op` runs (op names the public function in the error message).
    pallas_ok=False (the problem does not suit the kernel, e.g. an SSD chunk Triton cannot tile)
    makes None pick the XLA path."""
    if implementation is None:
        return "pallas" if pallas_ok and (interpret or jax.default_backend() == "gpu") else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise KernelInputError(
            f"{op}: implementation={implementation!r} is unknown; use None, 'pallas', 'xla' or 'reference'"
        )
    return implementation


def gpu_capability() -> float | None:
    """Compute capability of the default GPU (e.g. 9.0), None when the backend is not a GPU, 0.0
    on GPUs that report none (ROCm)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        return float(jax.devices()[0].compute_capability)
    except (AttributeError, ValueError):
        return 0.0


def has_fp8_conversions() -> bool:
    """True on NVIDIA GPUs with f32 <-> fp8 conversion instructions (sm_89 and newer)."""
    cc = gpu_capability()
    return cc is not None and cc >= 8.9
