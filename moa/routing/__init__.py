"""Routing: who decides which adapters a request uses."""

from moa.routing.decision import Mixture, RoutingDecision
from moa.routing.fixed import FixedRouter
from moa.routing.router import Router, RoutingRequest

__all__ = ["FixedRouter", "Mixture", "Router", "RoutingDecision", "RoutingRequest"]
