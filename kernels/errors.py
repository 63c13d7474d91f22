"""The one error kind kernels raise for bad input (shapes, dtypes, block sizes, implementations).

kernels/ imports nothing from horizon, so horizon.errors treats KernelInputError as a user error
alongside its own HorizonError kinds."""


class KernelInputError(ValueError):
    """Inputs a kernel API cannot take; the message names the argument, its value and the fix."""


def check_qkv(op: str, q, k, v, *, q_name: str, k_name: str, v_name: str) -> None:
    """The checks every attention kernel API makes of q [B, ..., H, D] against its keys and values
    [B, S, G, D]: v shaped like k, batch and head dim agreeing, one dtype, G dividing H."""
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    g = k.shape[2]
    if tuple(v.shape) != tuple(k.shape):
        raise KernelInputError(f"{op}: {v_name} shape {tuple(v.shape)} differs from {k_name} shape {tuple(k.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise KernelInputError(f"{op}: {k_name} shape {tuple(k.shape)} does not match {q_name} {tuple(q.shape)} "
                               "(batch and head dim must agree)")
    if not (q.dtype == k.dtype == v.dtype):
        raise KernelInputError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if h % g:
        raise KernelInputError(f"{op}: query heads H={h} are not a multiple of kv heads G={g}; use G dividing H")
