"""State-space mixers: Mamba-2 (SSD), LongMamba's training-free extension, SpaceTime's companion SSM."""

from horizon.ssm.ssd import Mamba2, Mamba2Cache  # noqa: F401
