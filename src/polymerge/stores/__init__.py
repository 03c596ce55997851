"""Expert stores: compressed containers of N experts that rebuild any expert by lookup.

Layout: :mod:`~polymerge.stores.manifest` (the folder format), :mod:`~polymerge.stores.store`
(the loaded store: lookup only), :mod:`~polymerge.stores.build` (the store method entry and
the build loop), :mod:`~polymerge.stores.export` (one expert as a checkpoint), and one module
per store method (``channel``, ``twin``, ``emr``, ``onebit``, and ``merged``: what a static or
learned merge of experts with task heads writes), each registering itself in
:mod:`polymerge.registry` when this package is imported. A new store method is one module here.
Experts' task heads (``...ForSequenceClassification``) are handled here generically: the build
loop stores them beside any method's pieces, the manifest records them (format version 2), a
:class:`Store` gives them back under each expert's own names, and an export is an ordinary
checkpoint of the expert's class; store methods see only the body.
"""

from polymerge.discovery import import_submodules
from polymerge.stores.build import StoreMethod, TensorBuilder
from polymerge.stores.export import export_expert
from polymerge.stores.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PIECES_DIR,
    ROUTER_DIR,
    TensorEntry,
    expert_part,
    is_store,
    piece_name,
    read_manifest,
)
from polymerge.stores.store import Store, open_store

import_submodules(__name__, __path__)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PIECES_DIR",
    "ROUTER_DIR",
    "Store",
    "StoreMethod",
    "TensorBuilder",
    "TensorEntry",
    "export_expert",
    "expert_part",
    "is_store",
    "open_store",
    "piece_name",
    "read_manifest",
]
