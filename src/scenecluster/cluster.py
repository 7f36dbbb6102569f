"""Public home of :class:`DPGMM`, kept so ``from scenecluster.cluster import DPGMM`` works; the
implementation is the :mod:`scenecluster.mixture` package."""

from scenecluster.mixture import DPGMM

__all__ = ["DPGMM"]
