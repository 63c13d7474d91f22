"""Pallas kernels with plain-jnp references. Imports nothing from horizon (only jax and numpy)."""
