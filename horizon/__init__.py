"""horizon: a JAX research framework for long-horizon sequence modeling."""

from horizon.config import Attention, Data, Experiment, Mesh, Model, Optim, Quant, SSM, Train  # noqa: F401
from horizon.errors import CheckpointError, ConfigError, DataError, HorizonError, ShapeError  # noqa: F401

__version__ = "0.1.0"
