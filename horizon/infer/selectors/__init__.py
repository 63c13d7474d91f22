"""Decode-time sparse selection: each selector turns the current query and a layer's key cache into
slot (or page) indices for kernels.sparse_decode.decode_attend. One file per method:

    selector = selectors.get(name)(**options)          # "full", "tokenselect", "tidaldecode", ...
    layer_state = selector.prepare(k_cache_BSGD, lengths_B, layer=i)   # after prefill, per layer
    shared = selector.init_shared(batch, n_heads)                      # every decode step
    idx_BHsK, counts_BHs, layer_state, shared = selector.select(
        q_BHD, k_cache_BSGD, lengths_B, layer_state, shared, layer=i)
    out = decode_attend(q, k_cache, v_cache, idx_BHsK, counts_BHs,
                        page_size=selector.page_size, lengths_B=lengths_B)

States are pytrees of static shape, so select runs inside lax.while_loop; `layer` is a static int.
Every selector keeps the newest slots (window / local_blocks) and optionally the first (sinks).
"""

from __future__ import annotations

import dataclasses

from horizon.errors import ConfigError
from horizon.infer.selectors.full import Full
from horizon.infer.selectors.hip import HiP
from horizon.infer.selectors.squeezed import Squeezed
from horizon.infer.selectors.tidaldecode import TidalDecode
from horizon.infer.selectors.tokenselect import TokenSelect

SELECTORS = {
    "full": Full,
    "tokenselect": TokenSelect,
    "tidaldecode": TidalDecode,
    "squeezed": Squeezed,
    "hip": HiP,
}


def get(name: str):
    """A constructor for the selector registered under `name`: get(name)(**options). An unknown
    option is a ConfigError naming the options the method takes."""
    try:
        cls = SELECTORS[name]
    except KeyError:
        raise ConfigError(
            f"decode selector {name!r} is unknown; choose one of {', '.join(sorted(SELECTORS))}"
        ) from None

    def make(**options):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(
                f"decode selector {name!r} takes no option(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(fields))}"
            )
        return cls(**options)

    return make


def get_selector(name: str = "full", options: dict | None = None):
    """get(name)(**options): the selector a Decode config names (`decode.policy`, `decode.options`)."""
    return get(name)(**(options or {}))


__all__ = ["SELECTORS", "Full", "HiP", "Squeezed", "TidalDecode", "TokenSelect", "get", "get_selector"]
