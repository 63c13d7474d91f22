"""The Mamba-2 mixer (Dao & Gu, "Transformers are SSMs", 2024): input projection to z, x, B, C, dt;
short causal depthwise convolution on x, B, C; the SSD scan (kernels.ssd); gated RMSNorm; output
projection. Segment ids reset both the convolution window and the SSM state at document
boundaries. Decoding carries a constant-size cache (conv windows + SSM state). Under a mesh with a
`context` axis > 1 the sequence stays sharded (contiguous layout, as the attention layers' ring
attention): the conv takes a (W-1)-token halo and the scan chains chunk states between shards
(horizon.ssm.context_parallel).

Quantization: the input projection (z, x, B, C fused into one GEMM, as Mamba-2's in_proj) and the
output projection follow the model's quant recipe under the paths "layers/{i}/ssm/in" and
"layers/{i}/ssm/out" (horizon.quant.assign), through horizon.quant.quantized_dot. The dt projection
stays high precision: it has one column per head (too narrow for 16-element blocks) and its error
is exponentiated through exp(dt A) and compounded along the sequence.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.config import Model
from horizon.errors import ConfigError, ShapeError
from horizon.layers.params import constant, normal, param
from horizon.quant.assign import SSM_GEMM_OFFSET, gemm_id, linear_recipe
from horizon.ssm.context_parallel import context_parallel_ssd, context_size
from horizon.ssm.longmamba import SOW_NAME, LongMambaLayer, filter_dt
from horizon.train.sharding import constrain
from kernels.ssd import ssd

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def _qdot(x, w_KN, recipe, quant_key, gemm_id_):
    """x @ w_KN through horizon.quant.quantized_dot with the layer's key, as horizon.layers.Linear."""
    from horizon.quant.dot import quantized_dot  # quantization is optional machinery

    key = jax.random.PRNGKey(0) if quant_key is None else quant_key
    return quantized_dot(x, w_KN, recipe, jax.random.fold_in(key, gemm_id_))


class Mamba2Cache(NamedTuple):
    """Decoding state of one mixer; its size does not grow with the sequence."""

    conv_x: jax.Array  # [B, W-1, inner]: the last conv inputs (compute dtype)
    conv_B: jax.Array  # [B, W-1, G*N]
    conv_C: jax.Array  # [B, W-1, G*N]
    ssm: jax.Array  # [B, H, P, N] float32
    length: jax.Array  # [] int32: tokens consumed so far (LongMamba's threshold depends on it)


def _uniform(bound: float):
    def init(key, shape, dtype=_F32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _dt_bias_init(dt_min: float, dt_max: float, floor: float = 1e-4):
    """softplus^{-1} of dt drawn log-uniformly in [dt_min, dt_max] (Mamba-2's initialisation)."""
    def init(key, shape, dtype=_F32):
        u = jax.random.uniform(key, shape, _F32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def _a_log_init(lo: float, hi: float):
    """A = -exp(A_log) with -A uniform in [lo, hi]."""
    def init(key, shape, dtype=_F32):
        return jnp.log(jax.random.uniform(key, shape, _F32, lo, hi)).astype(dtype)
    return init


def _shift(a_BT_, s: int, fill_B_=None):
    """a delayed by s steps along T (same length): out_t = a_{t-s}; the first s entries are the last
    s rows of `fill` ([B, >=s, ...]), or zeros. Zero-pad then slice (not a concatenate with the
    fill): with T sharded over the context axis GSPMD then moves an s-row halo between neighbouring
    shards instead of resharding the sequence. (jax 0.10: lax.pad with a negative high pad, the
    one-op form, was mis-partitioned when its input arrived replicated.)"""
    if s == 0:
        return a_BT_
    T = a_BT_.shape[1]
    widths = [(0, 0)] * a_BT_.ndim
    widths[1] = (s, 0)
    out = jnp.pad(a_BT_, widths)[:, :T]
    if fill_B_ is not None:  # fill is small and not sharded along T: pad it to T and add
        head = fill_B_[:, fill_B_.shape[1] - s:][:, :T].astype(a_BT_.dtype)
        widths[1] = (0, T - head.shape[1])
        out = out + jnp.pad(head, widths)
    return out


def _segment_resets(segment_ids_BT: jax.Array) -> jax.Array:
    """kernels.ssd.reference.segment_resets (True where a document starts, never at t = 0) as a
    shift-and-compare, which under context parallelism needs one halo token, not a gather."""
    seg = segment_ids_BT.astype(jnp.int32)
    return (seg != _shift(seg, 1)) & (jnp.arange(seg.shape[1]) > 0)


def causal_conv(u_BTC, w_WC, b_C, reset_BT, state_BKC):
    """Depthwise causal conv: out_t = b + sum_j w[j] u_{t-(W-1)+j}, inputs before t from `state`
    (K = W-1 earlier inputs). reset_BT (bool, or None): True where a document starts (never at
    t = 0, kernels.ssd.reference.segment_resets); a term u_{t-s} is dropped when a document starts
    in (t-s, t] (the state belongs to the first document). Returns (out [B, T, C], next state
    [B, K, C] with inputs of earlier documents zeroed).

    Only shifts by at most K along T, no cumulative sum over the sequence: with T sharded over the
    context axis every shard needs just a K-row halo from its left neighbour."""
    W = w_WC.shape[0]
    K, T = W - 1, u_BTC.shape[1]
    out_BTC = jnp.broadcast_to(b_C.astype(_F32), u_BTC.shape)
    same_doc_BT = None if reset_BT is None else jnp.ones(reset_BT.shape, bool)  # no start in (t-s, t]
    for s in range(W):  # tap j = K - s sees u_{t-s}
        if reset_BT is not None and s > 0:
            same_doc_BT = same_doc_BT & ~_shift(reset_BT, s - 1)
        term = _shift(u_BTC, s, state_BKC).astype(_F32) * w_WC[K - s].astype(_F32)
        if reset_BT is not None:
            term = jnp.where(same_doc_BT[..., None], term, 0.0)
        out_BTC = out_BTC + term
    # The last K inputs of [state, u].
    state_BKC = (u_BTC[:, T - K:] if T >= K else
                 jnp.concatenate([state_BKC[:, T:].astype(u_BTC.dtype), u_BTC], axis=1))
    if reset_BT is not None:  # the next token continues the last document only
        tail_BK = reset_BT[:, T - K:] if T >= K else jnp.concatenate(
            [jnp.zeros((reset_BT.shape[0], K - T), bool), reset_BT], axis=1)
        # Keep input i iff no document starts after it: no reset among tail[i+1:].
        later_BK = jnp.cumsum(tail_BK[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1] - tail_BK
        state_BKC = jnp.where((later_BK == 0)[..., None], state_BKC, jnp.zeros_like(state_BKC))
    return out_BTC, state_BKC


class Mamba2(nnx.Module):
    """Mamba-2 mixer. Call: mixer(x_BTM, positions_BT=..., segment_ids_BT=...) -> y_BTM.

    Decoding: cache = mixer.init_cache(B); y_BM, cache = mixer.step(x_BM, cache); or
    y_BTM, cache = mixer.prefill(x_BTM, cache=...) to consume a prompt (or a piece of a stream).
    LongMamba: mixer.longmamba (set by horizon.ssm.longmamba.enable) or the `longmamba` argument.
    implementation: kernels.ssd implementation (None picks the best available)."""

    def __init__(self, cfg: Model, *, layer_index: int, rngs: nnx.Rngs, implementation: str | None = None):
        s = cfg.ssm
        M = cfg.d_model
        inner = s.expand * M
        if inner % s.head_dim:
            raise ConfigError(f"model.ssm.head_dim: {s.head_dim} does not divide the inner width "
                              f"expand * d_model = {inner}; pick a divisor of {inner}")
        H = inner // s.head_dim
        if H % s.n_groups:
            raise ConfigError(f"model.ssm.n_groups: {s.n_groups} does not divide the {H} heads "
                              f"(inner {inner} / head_dim {s.head_dim}); pick a divisor of {H}")
        self.d_model, self.inner, self.n_heads = M, inner, H
        self.head_dim, self.n_groups, self.state_size = s.head_dim, s.n_groups, s.state_size
        self.conv_width, self.chunk = s.conv_width, s.chunk
        self.norm_eps = cfg.norm_eps
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.layer_index = layer_index
        self.implementation = implementation
        self.longmamba: LongMambaLayer | None = None
        self.collect_dt = False  # set by longmamba.calibrate: sow dt as an nnx.Intermediate
        # Static quantization treatment (a horizon.quant LinearRecipe, or None: high precision).
        self.in_recipe = linear_recipe(cfg, layer_index=layer_index, path=f"layers/{layer_index}/ssm/in")
        self.out_recipe = linear_recipe(cfg, layer_index=layer_index, path=f"layers/{layer_index}/ssm/out")
        self.in_gemm_id = gemm_id(layer_index, SSM_GEMM_OFFSET)
        self.out_gemm_id = gemm_id(layer_index, SSM_GEMM_OFFSET + 1)

        GN, W = s.n_groups * s.state_size, s.conv_width
        std = cfg.init_std
        self.w_z = param(rngs, normal(std), (M, inner), ("embed", "ssm_inner"))
        self.w_x = param(rngs, normal(std), (M, inner), ("embed", "ssm_inner"))
        self.w_B = param(rngs, normal(std), (M, GN), ("embed", None))
        self.w_C = param(rngs, normal(std), (M, GN), ("embed", None))
        self.w_dt = param(rngs, normal(std), (M, H), ("embed", "ssm_heads"))
        # PyTorch's default depthwise Conv1d init (fan_in = W), as in Mamba-2.
        bound = 1.0 / math.sqrt(W)
        self.conv_x = param(rngs, _uniform(bound), (W, inner), ("conv", "ssm_inner"))
        self.conv_x_bias = param(rngs, _uniform(bound), (inner,), ("ssm_inner",))
        self.conv_B = param(rngs, _uniform(bound), (W, GN), ("conv", None))
        self.conv_B_bias = param(rngs, _uniform(bound), (GN,), (None,))
        self.conv_C = param(rngs, _uniform(bound), (W, GN), ("conv", None))
        self.conv_C_bias = param(rngs, _uniform(bound), (GN,), (None,))
        self.dt_bias = param(rngs, _dt_bias_init(s.dt_min, s.dt_max), (H,), ("ssm_heads",))
        self.A_log = param(rngs, _a_log_init(s.a_init_min, s.a_init_max), (H,), ("ssm_heads",))
        self.D = param(rngs, constant(1.0), (H,), ("ssm_heads",))
        self.norm = param(rngs, constant(1.0), (inner,), ("norm",))
        # Residual-branch output scaled by 1/sqrt(2 n_layers) (GPT-2 style, as Mamba's init).
        self.w_out = param(rngs, normal(std / math.sqrt(2 * cfg.n_layers)), (inner, M), ("ssm_inner", "embed"))

    # --- pieces shared by the parallel form and the recurrent step --------------------------------

    def A_H(self) -> jax.Array:
        """Per-head decay rates A = -exp(A_log) [H], negative."""
        return -jnp.exp(self.A_log[...].astype(_F32))

    def _project(self, x_xM, quant_key=None):
        cdt = self.compute_dtype
        x = x_xM.astype(cdt)
        dt_raw = jnp.einsum("...m,mk->...k", x, self.w_dt[...].astype(cdt))
        if self.in_recipe is None:
            return (*(jnp.einsum("...m,mk->...k", x, w[...].astype(cdt))
                      for w in (self.w_z, self.w_x, self.w_B, self.w_C)), dt_raw)
        # One quantized GEMM over [z | x | B | C], as Mamba-2's fused in_proj; split after.
        ws = [w[...] for w in (self.w_z, self.w_x, self.w_B, self.w_C)]
        y = _qdot(x, jnp.concatenate(ws, axis=1), self.in_recipe, quant_key, self.in_gemm_id).astype(cdt)
        splits = list(itertools.accumulate(w.shape[1] for w in ws[:-1]))
        return (*jnp.split(y, splits, axis=-1), dt_raw)

    def _dt(self, dt_raw):
        return jax.nn.softplus(dt_raw.astype(_F32) + self.dt_bias[...].astype(_F32))

    def _gated_norm_out(self, y_xI, z_xI, quant_key=None):
        # RMSNormGated(norm_before_gate=False), grouped by n_groups as in Mamba-2.
        g = y_xI.astype(_F32) * jax.nn.silu(z_xI.astype(_F32))
        g = g.reshape(*g.shape[:-1], self.n_groups, self.inner // self.n_groups)
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.norm_eps)
        g = g.reshape(*g.shape[:-2], self.inner) * self.norm[...].astype(_F32)
        cdt = self.compute_dtype
        if self.out_recipe is None:
            return jnp.einsum("...i,im->...m", g.astype(cdt), self.w_out[...].astype(cdt))
        return _qdot(g.astype(cdt), self.w_out[...], self.out_recipe, quant_key, self.out_gemm_id).astype(cdt)

    def _scan(self, x_BTHP, dt_BTH, B_BTGN, C_BTGN, *, segment_ids_BT, initial_state_BHPN):
        """The SSD scan (y [B, T, H, P], final state [B, H, P, N]) of the parallel form.

        With a `context` mesh axis > 1 the sequence is sharded over it (logical `length`): each
        shard scans its piece and chunk states chain between shards (horizon.ssm.context_parallel).
        The layout is contiguous, the one horizon.attention.attend's ring attention assumes: tokens
        stay in natural order, so the recurrence and the causal conv (computed before, on the
        global arrays) see the true sequence order."""
        args = (x_BTHP, dt_BTH, self.A_H(), B_BTGN, C_BTGN)
        D_H = self.D[...].astype(_F32)
        if context_size() > 1:
            return context_parallel_ssd(*args, D_H=D_H, segment_ids_BT=segment_ids_BT,
                                        initial_state_BHPN=initial_state_BHPN, layout="contiguous",
                                        chunk=self.chunk, implementation=self.implementation)
        return ssd(*args, D=D_H, initial_state=initial_state_BHPN, segment_ids=segment_ids_BT,
                   chunk=self.chunk, implementation=self.implementation)

    def _longmamba(self, override):
        return self.longmamba if override is None else override

    # --- public API --------------------------------------------------------------------------------

    def init_cache(self, batch_size: int) -> Mamba2Cache:
        """Zero decoding state for `batch_size` rows."""
        K, GN, cdt = self.conv_width - 1, self.n_groups * self.state_size, self.compute_dtype
        return Mamba2Cache(
            conv_x=jnp.zeros((batch_size, K, self.inner), cdt),
            conv_B=jnp.zeros((batch_size, K, GN), cdt),
            conv_C=jnp.zeros((batch_size, K, GN), cdt),
            ssm=jnp.zeros((batch_size, self.n_heads, self.head_dim, self.state_size), _F32),
            length=jnp.zeros((), jnp.int32),
        )

    def __call__(self, x_BTM, *, positions_BT=None, segment_ids_BT=None,
                 longmamba: LongMambaLayer | None = None, quant_key=None):
        """y [B, T, M] for x [B, T, M]; positions are unused (the SSM is position-free).
        quant_key: the step's key for stochastic rounding in quantized projections (as Linear)."""
        del positions_BT
        return self.prefill(x_BTM, segment_ids_BT=segment_ids_BT, longmamba=longmamba, quant_key=quant_key)[0]

    def prefill(self, x_BTM, *, segment_ids_BT=None, cache: Mamba2Cache | None = None,
                longmamba: LongMambaLayer | None = None, quant_key=None) -> tuple[jax.Array, Mamba2Cache]:
        """Parallel (chunked) form from `cache` (None: zeros). Returns (y [B, T, M], next cache).

        The cache flows into the first segment of the row; later segments start from zero."""
        if x_BTM.ndim != 3 or x_BTM.shape[-1] != self.d_model:
            raise ShapeError(f"Mamba2: x shape {tuple(x_BTM.shape)} must be [batch, T, d_model={self.d_model}]")
        batch, T, _ = x_BTM.shape
        if segment_ids_BT is not None and tuple(segment_ids_BT.shape) != (batch, T):
            raise ShapeError(f"Mamba2: segment_ids shape {tuple(segment_ids_BT.shape)} must be {(batch, T)}")
        n_ctx = context_size()
        if n_ctx > 1 and T % n_ctx:
            raise ShapeError(f"Mamba2: sequence length {T} is not a multiple of the context axis size {n_ctx} "
                             f"(context parallelism shards the sequence); pick a length that is a multiple "
                             f"of {n_ctx}, or run without a context mesh axis")
        fresh = cache is None
        cache = self.init_cache(batch) if fresh else cache
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.state_size
        cdt = self.compute_dtype

        z, xi, Bi, Ci, dt_raw = self._project(x_BTM, quant_key)
        reset_BT = None if segment_ids_BT is None else _segment_resets(segment_ids_BT)
        convs = []
        for u, w, b, state in ((xi, self.conv_x, self.conv_x_bias, cache.conv_x),
                               (Bi, self.conv_B, self.conv_B_bias, cache.conv_B),
                               (Ci, self.conv_C, self.conv_C_bias, cache.conv_C)):
            out, state = causal_conv(u, w[...], b[...], reset_BT, state)
            convs.append((jax.nn.silu(out).astype(cdt), state.astype(cdt)))
        (xc, conv_x), (Bc, conv_B), (Cc, conv_C) = convs

        dt_BTH = self._dt(dt_raw)
        if self.collect_dt:
            self.sow(nnx.Intermediate, SOW_NAME, dt_BTH)
        lm = self._longmamba(longmamba)
        if lm is not None:
            dt_BTH = filter_dt(dt_BTH, lm, length=T if fresh else cache.length + T)

        y_BTHP, ssm_state = self._scan(
            constrain(xc.reshape(batch, T, H, P), ("batch", "length", "ssm_heads", None)),
            constrain(dt_BTH, ("batch", "length", "ssm_heads")),
            Bc.reshape(batch, T, G, N), Cc.reshape(batch, T, G, N),
            segment_ids_BT=segment_ids_BT, initial_state_BHPN=None if fresh else cache.ssm)
        y_BTM = self._gated_norm_out(y_BTHP.reshape(batch, T, self.inner), z, quant_key)
        next_cache = Mamba2Cache(conv_x, conv_B, conv_C, ssm_state, cache.length + T)
        return y_BTM.astype(x_BTM.dtype), next_cache

    def step(self, x_BM, cache: Mamba2Cache, *, longmamba: LongMambaLayer | None = None, quant_key=None
             ) -> tuple[jax.Array, Mamba2Cache]:
        """One decoding step: (y [B, M], next cache) for x [B, M] — the recurrence h_t =
        exp(dt A) h_{t-1} + dt x B^T, y = C h + D x with the conv window carried in the cache."""
        if x_BM.ndim != 2 or x_BM.shape[-1] != self.d_model:
            raise ShapeError(f"Mamba2.step: x shape {tuple(x_BM.shape)} must be [batch, d_model={self.d_model}]")
        batch = x_BM.shape[0]
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.state_size
        cdt = self.compute_dtype
        z, xi, Bi, Ci, dt_raw = self._project(x_BM, quant_key)
        convs = []
        for u, w, b, state in ((xi, self.conv_x, self.conv_x_bias, cache.conv_x),
                               (Bi, self.conv_B, self.conv_B_bias, cache.conv_B),
                               (Ci, self.conv_C, self.conv_C_bias, cache.conv_C)):
            window_BWC = jnp.concatenate([state, u[:, None].astype(state.dtype)], axis=1)
            out = b[...].astype(_F32) + jnp.einsum("bwc,wc->bc", window_BWC.astype(_F32),
                                                   w[...].astype(_F32), precision=_HIGHEST)
            convs.append((jax.nn.silu(out), window_BWC[:, 1:]))
        (xc, conv_x), (Bc, conv_B), (Cc, conv_C) = convs
        # The parallel form feeds the scan compute-dtype inputs; round the same way here.
        xc, Bc, Cc = (a.astype(cdt).astype(_F32) for a in (xc, Bc, Cc))

        dt_BH = self._dt(dt_raw)
        lm = self._longmamba(longmamba)
        if lm is not None:
            dt_BH = filter_dt(dt_BH[:, None], lm, length=cache.length + 1)[:, 0]
        x_BHP = xc.reshape(batch, H, P)
        rep = H // G
        B_BHN = jnp.repeat(Bc.reshape(batch, G, N), rep, axis=1)
        C_BHN = jnp.repeat(Cc.reshape(batch, G, N), rep, axis=1)
        decay_BH = jnp.exp(dt_BH * self.A_H())
        h_BHPN = (decay_BH[..., None, None] * cache.ssm
                  + (dt_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None, :])
        y_BHP = jnp.einsum("bhpn,bhn->bhp", h_BHPN, C_BHN, precision=_HIGHEST)
        y_BHP = y_BHP + self.D[...].astype(_F32)[:, None] * x_BHP
        y_BM = self._gated_norm_out(y_BHP.reshape(batch, self.inner), z, quant_key)
        next_cache = Mamba2Cache(conv_x, conv_B, conv_C, h_BHPN, cache.length + 1)
        return y_BM.astype(x_BM.dtype), next_cache
