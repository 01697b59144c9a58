"""Declarative per-family adapters for HuggingFace models (see ``_registry.py``), and tiny random models."""

from ._base import FamilyAdapter, ResolvedBlock
from ._registry import ADAPTERS, SUPPORTED_FAMILIES, get_adapter
from .tiny import ADVERSARIAL, TINY_ARCHS, adversarial_contexts, tiny_config, tiny_model

__all__ = ["FamilyAdapter", "ResolvedBlock", "ADAPTERS", "SUPPORTED_FAMILIES", "get_adapter",
           "TINY_ARCHS", "tiny_config", "tiny_model", "ADVERSARIAL", "adversarial_contexts"]
