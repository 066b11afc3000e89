"""What this box is: plain data (:mod:`fleet.hardware`) and the probe that fills it in."""

from fleet.hardware import HardwareProfile

__all__ = ["HardwareProfile"]
