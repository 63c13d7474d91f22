"""`get_selector`: the decode-time selector named by a Decode config, from horizon.infer.selectors
(full, TokenSelect, TidalDecode, Squeezed Attention, HiP at decode). horizon.infer.step calls it
through the contract documented in horizon.infer.selectors."""

from __future__ import annotations


def get_selector(name: str = "full", options: dict | None = None):
    """selectors.get(name)(**options); ConfigError for an unknown name or option."""
    from horizon.infer import selectors

    return selectors.get(name)(**(options or {}))
