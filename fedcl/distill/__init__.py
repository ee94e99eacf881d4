"""Distillers: compress real data into a SyntheticSet.  Importing this package registers every built-in method."""

from fedcl.distill.base import (
    Distiller,
    DistillResult,
    Source,
    accepted_options,
    available_distillers,
    create_distiller,
    distiller_class,
    register,
    supports_guide,
)
from fedcl.distill.coreset import HerdingCoreset, RandomCoreset
from fedcl.distill.dance import DualViewDistributionAlignment
from fedcl.distill.dc import GradientMatching, SiameseGradientMatching
from fedcl.distill.dd import DatasetDistillation
from fedcl.distill.dm import DistributionMatching
from fedcl.distill.idm import ImprovedDistributionMatching
from fedcl.distill.mtt import ExpertBuffer, TrajectoryMatching

__all__ = [
    "DistillResult",
    "Distiller",
    "DatasetDistillation",
    "DistributionMatching",
    "DualViewDistributionAlignment",
    "GradientMatching",
    "ExpertBuffer",
    "HerdingCoreset",
    "ImprovedDistributionMatching",
    "RandomCoreset",
    "SiameseGradientMatching",
    "Source",
    "TrajectoryMatching",
    "accepted_options",
    "available_distillers",
    "create_distiller",
    "distiller_class",
    "register",
    "supports_guide",
]
