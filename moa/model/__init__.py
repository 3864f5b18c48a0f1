"""The mixture model: base loading, target injection, MixtureLinear, MixtureModel."""

from moa.model.mixture_linear import MixtureLinear, RoutingState
from moa.model.mixture_model import MixtureModel

__all__ = ["MixtureLinear", "MixtureModel", "RoutingState"]
