"""Distillers: compress real data into a SyntheticSet.  Importing this package registers every built-in method."""

from fedcl.distill.base import (
    Distiller,
    DistillResult,
    Source,
    available_distillers,
    create_distiller,
    distiller_class,
    register,
)
from fedcl.distill.coreset import HerdingCoreset, RandomCoreset
from fedcl.distill.dm import DistributionMatching

__all__ = [
    "DistillResult",
    "Distiller",
    "DistributionMatching",
    "HerdingCoreset",
    "RandomCoreset",
    "Source",
    "available_distillers",
    "create_distiller",
    "distiller_class",
    "register",
]
