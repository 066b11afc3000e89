"""What this box is: plain data (:mod:`agent.hardware.types`) and the probe that fills it in."""

from agent.hardware.types import HardwareProfile

__all__ = ["HardwareProfile"]
