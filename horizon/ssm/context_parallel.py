"""Context parallelism for the Mamba-2 SSD scan (Dao & Gu, 2024): the sequence is sharded over the
`context` mesh axis and chunk states pass between shards.

Each shard scans its chunk(s) from a zero state with kernels.ssd.ssd; the (decay, final state)
summaries of all chunks are all-gathered and chained in sequence order (the recurrence is affine:
H_g = decay_g * H_{g-1} + h_g); then every shard adds the incoming state's contribution,
y_t += C_t^T (exp(sum_{s<=t} dt_s A) h_in), up to its first document boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from horizon.attention.ring import Layout, layout_indices
from horizon.errors import ConfigError, ShapeError

_F32 = jnp.float32


def context_size(mesh=None, axis: str = "context") -> int:
    """Size of mesh axis `axis` on `mesh` (default: the abstract mesh in scope); 1 without one.
    Callers switch to the context-parallel scan when it is > 1, as horizon.attention.attend does."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return 1
    return dict(mesh.shape).get(axis, 1)


def _chunk_summary(x, dt, A, B, C, D, seg, *, chunk, implementation):
    """Scan one chunk from a zero state. Returns y, its final state, the chunk's total decay
    [B, H] (0 if a document starts inside it) and the per-token carry-in weights [B, T, H]."""
    from kernels.ssd import ssd

    y, h = ssd(x, dt, A, B, C, D=D, segment_ids=seg, chunk=chunk, implementation=implementation)
    acum_BTH = jnp.cumsum(dt.astype(_F32) * A.astype(_F32), axis=1)
    # The incoming state reaches token t only if no document starts in (0, t].
    change = jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    open_BT = jnp.cumsum(change, axis=1) == 0
    carry_in_BTH = jnp.exp(acum_BTH) * open_BT[..., None]
    return y, h, carry_in_BTH[:, -1], carry_in_BTH


def ssd_context_parallel(x_BTHP: jax.Array, dt_BTH: jax.Array, A_H: jax.Array, B_BTGN: jax.Array,
                         C_BTGN: jax.Array, *, axis_name: str, D_H: jax.Array | None = None,
                         segment_ids_BT: jax.Array | None = None, initial_state_BHPN: jax.Array | None = None,
                         layout: Layout = "contiguous", chunk: int | None = None,
                         implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """kernels.ssd.ssd over a sequence sharded on `axis_name`; call inside shard_map.

    Arrays are this device's shard (shapes as kernels.ssd.ssd with local T). Under "contiguous"
    device d holds tokens [d T, (d+1) T); under "zigzag" it holds chunks d and 2n-1-d of 2n (see
    horizon.attention.ring.zigzag_indices). Returns (y [B, T, H, P] in x's dtype, the final state
    of the whole sequence [B, H, P, N] float32, the same on every device).
    """
    n = jax.lax.axis_size(axis_name)
    d = jax.lax.axis_index(axis_name)
    Bsz, T, H, Pd = x_BTHP.shape
    G, N = B_BTGN.shape[2:]
    k = 2 if layout == "zigzag" else 1
    if T % k:
        raise ShapeError(f"ssd_context_parallel: local length {T} is not a multiple of {k} ({layout} layout)")
    seg = jnp.zeros((Bsz, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    split = lambda a: jnp.split(a, k, axis=1) if k > 1 else [a]
    parts = [_chunk_summary(*c, D_H, s, chunk=chunk, implementation=implementation)
             for *c, s in zip(split(x_BTHP), split(dt_BTH), [A_H] * k, split(B_BTGN), split(C_BTGN), split(seg))]

    # Gather every chunk's summary: [n, k, ...], then chain them in sequence order.
    stack = lambda i: jnp.stack([p[i] for p in parts])
    first, last = jnp.stack([s[:, 0] for s in split(seg)]), jnp.stack([s[:, -1] for s in split(seg)])
    g_h, g_decay, g_first, g_last = (jax.lax.all_gather(a, axis_name) for a in (stack(1), stack(2), first, last))

    def owner(g):  # (device, slot) of global chunk g, static
        if layout == "zigzag":
            return (g, 0) if g < n else (2 * n - 1 - g, 1)
        return g, 0

    h_run = (jnp.zeros((Bsz, H, Pd, N), _F32) if initial_state_BHPN is None
             else initial_state_BHPN.astype(_F32))
    h_in = []
    for g in range(n * k):
        dv, sl = owner(g)
        if g > 0:  # a document starting at the chunk's first token drops the incoming state
            pd, ps = owner(g - 1)
            h_run = h_run * (g_first[dv, sl] == g_last[pd, ps]).astype(_F32)[:, None, None, None]
        h_in.append(h_run)
        h_run = g_decay[dv, sl][:, :, None, None] * h_run + g_h[dv, sl]
    h_in = jnp.stack(h_in)  # [n k, B, H, P, N] in sequence order

    ys = []
    rep = H // G
    for sl, (y, _, _, carry_in_BTH) in enumerate(parts):
        g = d if (layout != "zigzag" or sl == 0) else 2 * n - 1 - d
        hin_BHPN = jax.lax.dynamic_index_in_dim(h_in, g, keepdims=False)
        C_BTHN = jnp.repeat(split(C_BTGN)[sl].astype(_F32), rep, axis=2)
        y_in = jnp.einsum("bthn,bhpn->bthp", C_BTHN, hin_BHPN, precision=jax.lax.Precision.HIGHEST)
        ys.append((y.astype(_F32) + carry_in_BTH[..., None] * y_in).astype(x_BTHP.dtype))
    y_BTHP = jnp.concatenate(ys, axis=1) if k > 1 else ys[0]
    return y_BTHP, h_run


def context_parallel_ssd(x_BTHP: jax.Array, dt_BTH: jax.Array, A_H: jax.Array, B_BTGN: jax.Array,
                         C_BTGN: jax.Array, *, D_H: jax.Array | None = None,
                         segment_ids_BT: jax.Array | None = None, initial_state_BHPN: jax.Array | None = None,
                         mesh=None, axis: str = "context", layout: Layout = "contiguous",
                         chunk: int | None = None, implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """kernels.ssd.ssd on global (jit-level) arrays whose T axis is sharded over mesh axis `axis`,
    in `layout` order (see horizon.attention.ring.to_layout). Returns (y [B, T, H, P] in the same
    layout, final_state [B, H, P, N] float32). ShapeError if the context size does not divide T."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or axis not in mesh.axis_names:
        raise ConfigError(f"context_parallel_ssd needs an active mesh with a {axis!r} axis")
    from horizon.attention.ring import _batch_and_head_axes

    Bsz, T, H, _ = x_BTHP.shape
    G = B_BTGN.shape[2]
    n = mesh.shape[axis]
    layout_indices(T, n, layout)  # validates divisibility
    b, h = _batch_and_head_axes(mesh, axis, Bsz, H, G)
    seg = jnp.zeros((Bsz, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    D = jnp.zeros((H,), x_BTHP.dtype) if D_H is None else D_H
    N = B_BTGN.shape[3]
    h0 = jnp.zeros((Bsz, H, x_BTHP.shape[3], N), jnp.float32) if initial_state_BHPN is None else initial_state_BHPN

    def local_fn(x, dt, A, B, C, Dl, s, h0):
        return ssd_context_parallel(x, dt, A, B, C, axis_name=axis, D_H=Dl, segment_ids_BT=s, initial_state_BHPN=h0,
                                    layout=layout, chunk=chunk, implementation=implementation)

    in_specs = (P(b, axis, h, None), P(b, axis, h), P(h), P(b, axis, h, None), P(b, axis, h, None), P(h), P(b, axis),
                P(b, h, None, None))
    out_specs = (P(b, axis, h, None), P(b, h, None, None))
    fn = jax.shard_map(local_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return fn(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D, seg, h0)


__all__ = ["context_parallel_ssd", "context_size", "ssd_context_parallel"]
