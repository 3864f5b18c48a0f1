"""Adapter types (configs + per-module layers) and the PEFT file format."""

from moa.adapters.base import AdapterConfig, AdapterLayer
from moa.adapters.lora import LoraConfig, LoraLayer

__all__ = ["AdapterConfig", "AdapterLayer", "LoraConfig", "LoraLayer"]
