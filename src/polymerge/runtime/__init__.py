"""Runtimes over expert stores: route each request, switch weights by lookup, run."""

from polymerge.runtime.routed import (
    RoutedGeneration,
    RoutedModel,
    RoutedModule,
    RoutedOutput,
    load_store,
)
from polymerge.runtime.twin import TwinModel

__all__ = ["RoutedGeneration", "RoutedModel", "RoutedModule", "RoutedOutput", "TwinModel",
           "load_store"]
