"""Runtimes over expert stores: route each request, switch weights by lookup, run."""

from polymerge.runtime.routed import (
    RoutedGeneration,
    RoutedModel,
    RoutedModule,
    RoutedOutput,
    load_store,
)

__all__ = ["RoutedGeneration", "RoutedModel", "RoutedModule", "RoutedOutput", "load_store"]
