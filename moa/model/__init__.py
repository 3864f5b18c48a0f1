"""The mixture model: base loading, target injection, MixtureLinear, MixtureModel."""

from moa.model.adapter_bank import AUTO_ROW, BASE_ROW, AdapterBank, BankBusyError
from moa.model.mixture_linear import MixtureLinear
from moa.model.mixture_model import MixtureModel

__all__ = ["AUTO_ROW", "BASE_ROW", "AdapterBank", "BankBusyError", "MixtureLinear", "MixtureModel"]
