"""Expert stores: compressed containers of N experts that rebuild any expert by lookup.

Importing this package registers the built-in store methods (``polymerge merge`` dispatches to
them through :mod:`polymerge.builders`).
"""

from polymerge.stores import channel, twin
from polymerge.stores.base import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Store,
    StoreMethod,
    TensorEntry,
    build_store,
    export_expert,
    get_store_method,
    is_store,
    open_store,
    plan_store,
    read_manifest,
    register_store_method,
    store_method_names,
)
from polymerge.stores.channel import ChannelStore
from polymerge.stores.twin import TwinStore

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ChannelStore",
    "Store",
    "StoreMethod",
    "TensorEntry",
    "TwinStore",
    "build_store",
    "channel",
    "export_expert",
    "get_store_method",
    "is_store",
    "open_store",
    "plan_store",
    "read_manifest",
    "register_store_method",
    "store_method_names",
    "twin",
]
