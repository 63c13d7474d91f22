"""Layers: thin NNX modules (linear, norm, MLP, embedding) around pure functions."""
