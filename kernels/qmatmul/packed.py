"""PackedQTensor: an E2M1 QTensor with two codes per byte along the last axis, the storage the
Pallas matmul streams for weight-only decoding (half the bytes of one-code-per-byte QTensors).

Same scales and tensor scale as the QTensor it packs; `pack_e2m1` order (element 2i low nibble).
"""

from __future__ import annotations

import dataclasses

import jax

from kernels.errors import KernelInputError
from kernels.qmatmul.qtensor import ELEMENT_FORMAT, QTensor, pack_e2m1, unpack_e2m1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedQTensor:
    """packed: uint8 [..., K/2]; scales, tensor_scale, fmt, block_shape as in QTensor."""

    packed: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array
    fmt: str = dataclasses.field(metadata={"static": True})
    block_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    @property
    def ndim(self) -> int:
        return self.packed.ndim

    def unpack(self) -> QTensor:
        """The one-code-per-byte QTensor (exact)."""
        return QTensor(
            unpack_e2m1(self.packed), self.scales, self.tensor_scale, self.fmt, self.block_shape
        )


def pack(q: QTensor) -> PackedQTensor:
    """Pack an E2M1 QTensor (nvfp4, mxfp4) two codes per byte along its last axis."""
    if ELEMENT_FORMAT[q.fmt] != "e2m1":
        raise KernelInputError(
            f"pack: fmt={q.fmt!r} has 8-bit elements; only nvfp4/mxfp4 (E2M1) pack two per byte"
        )
    if q.shape[-1] % 2:
        raise KernelInputError(
            f"pack: last dim {q.shape[-1]} is odd; pad it to an even length first"
        )
    return PackedQTensor(pack_e2m1(q.codes), q.scales, q.tensor_scale, q.fmt, q.block_shape)
