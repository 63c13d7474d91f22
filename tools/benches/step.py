"""Train-step throughput: horizon's jitted train step against a minimal hand-written pure-JAX step
of the same model (width, depth, heads, sequence length, AdamW + clipping) in the same process,
and achieved FLOP/s as a fraction of a large fp32 matmul's FLOP/s measured in the same run.

Usage: tools/bench.py step [--d-model 192 --n-layers 4 --n-heads 6 --n-kv-heads 2 --seq-len 256 --batch 16]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tools.benches._timing import machine, time_fn


def _minimal_step(cfg, optimizer):
    """A hand-written decoder LM train step (same architecture as horizon.models.LM)."""
    H, G, D, M, F, V = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff, cfg.vocab_size

    def init(key):
        ks = iter(jax.random.split(key, 8 * cfg.n_layers + 2))
        n = lambda shape, std=0.02: std * jax.random.normal(next(ks), shape)  # noqa: E731
        layers = [dict(n1=jnp.ones(M), q=n((M, H * D)), k=n((M, G * D)), v=n((M, G * D)), o=n((H * D, M)),
                       n2=jnp.ones(M), g=n((M, F)), u=n((M, F)), d=n((F, M))) for _ in range(cfg.n_layers)]
        return dict(emb=n((V, M)), layers=layers, nf=jnp.ones(M))

    def norm(x, s):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * s

    def rope(x, pos):
        inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2) / D))
        a = pos[..., None] * inv
        c, s = jnp.cos(a)[:, :, None], jnp.sin(a)[:, :, None]
        x1, x2 = jnp.split(x, 2, -1)
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def loss_fn(p, b):
        x = p["emb"][b["inputs"]]
        B, T = b["inputs"].shape
        seg = b["segment_ids"]
        mask = (jnp.tril(jnp.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
        for lp in p["layers"]:
            h = norm(x, lp["n1"])
            q = rope((h @ lp["q"]).reshape(B, T, H, D), b["positions"])
            k = rope((h @ lp["k"]).reshape(B, T, G, D), b["positions"])
            v = (h @ lp["v"]).reshape(B, T, G, D)
            a = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(B, T, H * D)
            x = x + a @ lp["o"]
            h = norm(x, lp["n2"])
            x = x + (jax.nn.silu(h @ lp["g"]) * (h @ lp["u"])) @ lp["d"]
        logits = norm(x, p["nf"]) @ p["emb"].T
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
        return jnp.sum(ce * b["weights"]) / jnp.sum(b["weights"])

    @jax.jit
    def step(state, b):
        p, o = state
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, o = optimizer.update(g, o, p)
        return (optax.apply_updates(p, u), o), loss

    params = init(jax.random.PRNGKey(0))
    return step, (params, optimizer.init(params))


def run(args: list[str]) -> dict:
    from flax import nnx

    from horizon.config import Data, Experiment, Mesh, Model, Train
    from horizon.data.batches import Batches
    from horizon.data.corpus import load_store
    from horizon.models.lm import count_params
    from horizon.train import loop, sharding
    from horizon.train.optim import learning_rate, make_optimizer
    from horizon.train.state import init_state
    from horizon.train.step import make_train_step

    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=6)
    ap.add_argument("--n-kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args(args)
    cfg = Experiment(model=Model(d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads),
                     data=Data(seq_len=a.seq_len, batch_size=a.batch), train=Train(steps=1000), mesh=Mesh(data=1))
    batch = {k: jnp.asarray(v) for k, v in
             Batches(load_store(None), cfg.data, split="train", seed=0).batch(0).items()}
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh):
        graphdef, params, psh = loop.build_model(cfg, mesh)
        opt = make_optimizer(cfg.optim, cfg.train.steps)
        ssh = loop.state_shardings(opt, params, psh, mesh)
        state = init_state(params, opt)
        fn = jax.jit(make_train_step(graphdef, opt, cfg, learning_rate(cfg.optim, cfg.train.steps)),
                     in_shardings=(ssh, loop.batch_sharding(mesh)), out_shardings=(ssh, None))
        horizon_s = time_fn(lambda s, b: fn(s, b)[1]["loss"], state, batch, iters=a.iters)
        n_params = count_params(nnx.merge(graphdef, params))
    mstep, mstate = _minimal_step(cfg.model, make_optimizer(cfg.optim, cfg.train.steps))
    minimal_s = time_fn(lambda s, b: mstep(s, b)[1], mstate, batch, iters=a.iters)

    n = 2048
    x = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    matmul_flops = 2 * n**3 / time_fn(mm, x, iters=a.iters)
    tokens = a.batch * a.seq_len
    L, T, M = cfg.model.n_layers, a.seq_len, cfg.model.d_model
    # 6 N per token for the dense GEMMs, plus causal attention scores and values (fwd + bwd).
    step_flops = 6 * n_params * tokens + 6 * L * a.batch * T * T * M
    return {
        "bench": "step", "machine": machine(), "n_params": n_params, "tokens_per_step": tokens,
        "horizon_tokens_per_s": tokens / horizon_s, "minimal_tokens_per_s": tokens / minimal_s,
        "ratio_horizon_over_minimal": minimal_s / horizon_s,
        "horizon_flops_fraction_of_matmul": step_flops / horizon_s / matmul_flops,
        "matmul_gflops": matmul_flops / 1e9,
    }
