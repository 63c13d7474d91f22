"""Selection policies: each turns positions (and, for dynamic ones, queries/keys) into a Selection
for kernels.sparse_attention.attend. A model picks one per layer by name + kwargs:

    sel = policies.build("sinks", positions_BT, segment_ids_BT, window=512, n_sinks=4,
                         q_BTHD=q, k_BSGD=k, v_BSGD=v, layer=i, n_layers=L)

`build` passes each policy only the arguments its signature names, so a config can hold
{"name": ..., **kwargs} for any policy and the call site stays the same. Landmark attention
(grouped softmax) is a kernel variant, not a policy, and is not here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from horizon.attention.policies.cca import cca
from horizon.attention.policies.dense_causal import dense_causal
from horizon.attention.policies.ema_sink import ema_sink
from horizon.attention.policies.hip import hip
from horizon.attention.policies.longgen import full_layers, longgen
from horizon.attention.policies.longheads import longheads
from horizon.attention.policies.sinks import sinks
from horizon.attention.policies.sliding_window import sliding_window
from horizon.attention.selection import Selection
from horizon.errors import ConfigError

POLICIES: dict[str, Callable[..., Selection]] = {
    "dense_causal": dense_causal,
    "sliding_window": sliding_window,
    "sinks": sinks,
    "ema_sink": ema_sink,
    "longgen": longgen,
    "longheads": longheads,
    "hip": hip,
    "cca": cca,
}

# Call-site arguments every policy may receive; each takes only those it names.
CONTEXT_ARGS = ("q_BTHD", "k_BSGD", "v_BSGD", "layer", "n_layers", "rope_inv_freq")


def get(name: str) -> Callable[..., Selection]:
    """The policy function registered under `name`."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ConfigError(
            f"attention policy {name!r} is unknown; choose one of {', '.join(sorted(POLICIES))}"
        ) from None


def build(name: str, positions, segment_ids=None, **kwargs) -> Selection:
    """policies.get(name)(positions, segment_ids, ...) with the context arguments
    (CONTEXT_ARGS) the policy does not take dropped; any other unknown kwarg is a ConfigError."""
    fn = get(name)
    params = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in params and k not in CONTEXT_ARGS]
    if unknown:
        raise ConfigError(
            f"attention policy {name!r} takes no argument(s) {', '.join(unknown)}; "
            f"it takes {', '.join(p for p in params if p not in ('positions', 'segment_ids'))}"
        )
    args = {k: v for k, v in kwargs.items() if k in params}
    return fn(positions, segment_ids, **args)


__all__ = [
    "CONTEXT_ARGS",
    "POLICIES",
    "build",
    "cca",
    "dense_causal",
    "ema_sink",
    "full_layers",
    "get",
    "hip",
    "longgen",
    "longheads",
    "sinks",
    "sliding_window",
]
