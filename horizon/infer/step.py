"""The LM's forward with caches: `prefill` (a batch of prompts through the model's own forward,
collecting every attention layer's keys/values into its cache and every Mamba-2 layer's recurrent
state), `decode_step` (one token per row; attention through kernels.sparse_decode.decode_attend
over the slots a selector picks) and `extend` (several tokens per row at once). Pure functions of a
merged model; horizon.infer.generate jits them over the split state.

The layer walk mirrors horizon.models.blocks.Block (x + mixer(norm1 x), then x + mlp(norm2 x)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horizon.errors import ConfigError, ShapeError
from horizon.infer import cache as kv
from kernels.sparse_decode import decode_attend

# ------------------------------------------------------------------------------------ caches


def init_caches(model, decode, *, batch: int, capacity: int, layers=None) -> list:
    """One cache per layer: an attention cache of `decode.cache` kind with `capacity` slots, or the
    Mamba-2 layer's zero recurrent state. layers: blocks of the model's shapes other than its own
    stack (e.g. its MTP head blocks); default model.layers."""
    cfg = model.cfg
    caches = []
    for block in model.layers if layers is None else layers:
        if block.mixer_name == "attn":
            caches.append(kv.init_cache(decode.cache, batch=batch, capacity=capacity, kv_heads=cfg.kv_heads,
                                        head_dim=cfg.head_dim, dtype=jnp.dtype(cfg.compute_dtype),
                                        n_sinks=decode.n_sinks, page_size=decode.page_size, alpha=decode.ema))
        else:
            caches.append(block.mixer.init_cache(batch))
    return caches


def check_caches(model, caches) -> None:
    """ShapeError if `caches` were built for another model config (layers, mixers, kv heads, head dim)."""
    from horizon.ssm.ssd import Mamba2Cache

    cfg = model.cfg
    if len(caches) != cfg.n_layers:
        raise ShapeError(f"{len(caches)} caches for a model of {cfg.n_layers} layers: they were built for "
                         "another model config; build them with init_caches(model, ...)")
    for i, (block, c) in enumerate(zip(model.layers, caches)):
        if block.mixer_name == "attn":
            if not isinstance(c, tuple(kv.KINDS.values())):
                raise ShapeError(f"layer {i} is attention but its cache is a {type(c).__name__}: the caches "
                                 "were built for another model config; build them with init_caches(model, ...)")
            kv.check_cache(c, layer=i, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)
        else:
            m = block.mixer
            want = (m.n_heads, m.head_dim, m.state_size)
            if not isinstance(c, Mamba2Cache) or tuple(c.ssm.shape[1:]) != want:
                raise ShapeError(f"layer {i} is a Mamba-2 layer with state {want} but its cache is "
                                 f"{type(c).__name__}: the caches were built for another model config; "
                                 "build them with init_caches(model, ...)")


# ------------------------------------------------------------------------------------ pieces


def _mlp(block, x_BTM):
    return x_BTM + block.mlp(block.norm2(x_BTM))


def _logits(model, x_BTM):
    return model.logits(model.final_norm(x_BTM)).astype(jnp.float32)


def _attend(mixer, q_BHD, k_BSGD, v_BSGD, indices, counts, *, page_size=1, lengths_B=None):
    att = mixer.cfg.attention
    return decode_attend(q_BHD.astype(k_BSGD.dtype), k_BSGD, v_BSGD, indices, counts, page_size=page_size,
                         lengths_B=lengths_B, softcap=att.softcap or None, implementation=att.implementation)


# ------------------------------------------------------------------------------------ prefill


def prefill(model, caches, tokens_BP, lengths_B):
    """(logits at each row's last prompt token [B, V] float32, filled caches).

    tokens_BP: LEFT-padded prompts (row b's tokens in the last lengths_B[b] columns). Padding is its
    own document (segment 0, the prompt segment 1), so the model's forward, with its attention policy
    and document masking, and Mamba-2's segment resets keep it out of every prompt token.
    """
    check_caches(model, caches)
    P = tokens_BP.shape[1]
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    start_B = P - lengths_B
    col = jnp.arange(P, dtype=jnp.int32)[None, :]
    seg_BP = (col >= start_B[:, None]).astype(jnp.int32)
    pos_BP = jnp.maximum(col - start_B[:, None], 0)
    # column of position j in row b, to lay the keys out by position for the caches
    src_BP = jnp.clip(start_B[:, None] + col, 0, P - 1)

    def by_position(x_BPGD):
        return jnp.take_along_axis(x_BPGD, src_BP[:, :, None, None], axis=1)

    x = model.embed(tokens_BP)
    out = []
    for block, c in zip(model.layers, caches):
        h = block.norm1(x)
        if block.mixer_name == "attn":
            y, (k_raw, k_rot, v) = block.mixer(h, positions_BT=pos_BP, segment_ids_BT=seg_BP, return_kv=True)
            k = k_rot if kv.stores_rotated(c) else k_raw
            out.append(kv.fill(c, by_position(k), by_position(v), lengths_B))
        else:
            y, state = block.mixer.prefill(h, segment_ids_BT=seg_BP)
            out.append(state)
        x = _mlp(block, x + y)
    return _logits(model, x[:, -1:])[:, 0], out


def prepare_selector(selector, caches, model):
    """Per-layer selector state after prefill (None for Mamba-2 layers and streaming caches)."""
    import inspect

    # Selectors that keep per-head state (TokenSelect) also take the query-head count.
    extra = {"n_heads": model.cfg.n_heads} if "n_heads" in inspect.signature(selector.prepare).parameters else {}
    states = []
    for i, (block, c) in enumerate(zip(model.layers, caches)):
        if block.mixer_name == "attn" and isinstance(c, (kv.FullCache, kv.PagedCache)):
            states.append(selector.prepare(c.k, c.length, layer=i, **extra))
        else:
            states.append(None)
    return states


# ------------------------------------------------------------------------------------ decode


def _attn_step(mixer, h_BM, c, selector, layer_state, shared, layer):
    """One token's attention output [B, M] and the updated cache / selector state."""
    cfg = mixer.cfg
    B = h_BM.shape[0]
    q, k_raw, v = mixer.project(h_BM[:, None])
    if isinstance(c, kv.StreamingCache):
        c = kv.append(c, k_raw[:, 0], v[:, 0])
        slot_pos_BC, q_pos_B = kv.streaming_positions(c)
        # keys rotate at their cache positions every step (StreamingLLM Sec. 3.2)
        k_rot = mixer.rope(c.k, slot_pos_BC)
        q = mixer.rope(q, q_pos_B[:, None])[:, 0]
        s = kv.capacity(c)
        out = _attend(mixer, q, k_rot, c.v, jnp.arange(s, dtype=jnp.int32)[None, None],
                      jnp.full((1, 1), s, jnp.int32), lengths_B=jnp.minimum(c.length, s))
    else:
        pos_B1 = c.length[:, None]
        q = mixer.rope(q, pos_B1)[:, 0]
        c = kv.append(c, mixer.rope(k_raw, pos_B1)[:, 0], v[:, 0])
        if isinstance(c, kv.EmaSinkCache):
            idx, counts = kv.ema_visible(c)
            out = _attend(mixer, q, c.k, c.v, idx, counts)
        else:
            idx, counts, layer_state, shared = selector.select(q, c.k, c.length, layer_state, shared, layer=layer)
            out = _attend(mixer, q, c.k, c.v, idx, counts, page_size=selector.page_size, lengths_B=c.length)
    y = mixer.o(out.reshape(B, 1, cfg.n_heads * cfg.head_dim))[:, 0]
    return y, c, layer_state, shared


def decode_step(model, caches, tokens_B, selector, layer_states):
    """(logits [B, V] float32 for the token after `tokens_B`, caches, layer_states) after feeding one
    token per row at each row's next position."""
    B = tokens_B.shape[0]
    x = model.embed(tokens_B[:, None])[:, 0]
    shared = selector.init_shared(B, model.cfg.n_heads)
    out_c, out_s = [], []
    for i, (block, c, ls) in enumerate(zip(model.layers, caches, layer_states)):
        h = block.norm1(x)
        if block.mixer_name == "attn":
            y, c, ls, shared = _attn_step(block.mixer, h, c, selector, ls, shared, i)
        else:
            y, c = block.mixer.step(h, c)
        out_c.append(c)
        out_s.append(ls)
        x = _mlp(block, (x + y)[:, None])[:, 0]
    return _logits(model, x[:, None])[:, 0], out_c, out_s


def extend(model, caches, tokens_BT):
    """(logits [B, T, V] float32 after each of the T tokens, caches with the T tokens appended).

    Full and paged caches (and Mamba-2 states) take the T tokens in one parallel pass: every query
    attends all written slots up to its own (the "full" selection; verification of a draft must see
    exactly what the target sees). Streaming and EMA-sink caches evict as they go, so they take the
    tokens one at a time.
    """
    check_caches(model, caches)
    if any(isinstance(c, (kv.StreamingCache, kv.EmaSinkCache)) for c in caches):
        from horizon.infer.selectors import get_selector

        sel = get_selector("full")
        states = [None] * len(caches)

        def body(cs, tok_B):
            logits, cs, _ = decode_step(model, cs, tok_B, sel, states)
            return cs, logits

        caches, logits_TBV = jax.lax.scan(body, caches, tokens_BT.T)
        return jnp.moveaxis(logits_TBV, 0, 1), caches
    x, caches = extend_layers(model.layers, caches, model.embed(tokens_BT))
    return _logits(model, x), caches


def extend_layers(layers, caches, x_BTM):
    """(residual stream [B, T, M] after `layers`, their caches with the T inputs appended): the
    parallel pass of `extend` for full or paged caches and Mamba-2 states, from the inputs of the
    first layer (a model's embeddings, or the trunk for its MTP head blocks)."""
    B, T = x_BTM.shape[:2]
    x = x_BTM
    out = []
    for block, c in zip(layers, caches):
        h = block.norm1(x)
        if block.mixer_name == "attn":
            m = block.mixer
            cfg = m.cfg
            pos_BT = c.length[:, None] + jnp.arange(T, dtype=jnp.int32)
            q, k_raw, v = m.project(h)
            q = m.rope(q, pos_BT)
            k = m.rope(k_raw, pos_BT)
            c = kv.append_many(c, k, v)
            s = kv.capacity(c)

            def one(q_BHD, len_B, c=c, m=m, s=s):
                return _attend(m, q_BHD, c.k, c.v, jnp.arange(s, dtype=jnp.int32)[None, None],
                               jnp.full((1, 1), s, jnp.int32), lengths_B=len_B)

            o_TBHD = jax.vmap(one)(jnp.moveaxis(q, 1, 0), (pos_BT + 1).T)
            y = m.o(jnp.moveaxis(o_TBHD, 0, 1).reshape(B, T, cfg.n_heads * cfg.head_dim))
            out.append(c)
        else:
            y, c = block.mixer.prefill(h, cache=c)
            out.append(c)
        x = _mlp(block, x + y)
    return x, out


def require_capacity(caches, needed: int, *, what: str) -> None:
    """ConfigError if a full or paged cache has fewer than `needed` slots (streaming caches evict)."""
    for c in caches:
        if isinstance(c, (kv.FullCache, kv.PagedCache)) and kv.capacity(c) < needed:
            raise ConfigError(f"decode.cache_size: {what} needs {needed} cache slots but the {type(c).__name__} "
                              f"holds {kv.capacity(c)}; raise --cache-size, or use --cache streaming (or "
                              "ema_sink), whose fixed size evicts old tokens")
