"""Mamba-2 SSD (state-space duality) scan: sequential reference, chunked XLA, chunked Pallas."""

from kernels.ssd.api import DEFAULT_CHUNK, IMPLEMENTATIONS, resolve_implementation, ssd  # noqa: F401
from kernels.ssd.reference import ssd_reference  # noqa: F401
from kernels.ssd.xla import ssd_xla  # noqa: F401
