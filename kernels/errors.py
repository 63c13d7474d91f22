"""The one error kind kernels raise for bad input (shapes, dtypes, block sizes, implementations).

kernels/ imports nothing from horizon, so horizon.errors treats KernelInputError as a user error
alongside its own HorizonError kinds."""


class KernelInputError(ValueError):
    """Inputs a kernel API cannot take; the message names the argument, its value and the fix."""
