"""The shard store: a model cut into vertical shards, each at several fidelity versions.

    >>> from sti.store import pack, Store
    >>> pack("minilm", "minilm.sti")            # checkpoint -> store directory
    >>> store = Store.open("minilm.sti")
    >>> w = store.assemble_layer(0, {0: 4, 1: 8, 5: 32})   # 3 heads of layer 0 at 4, 8, 32 bits

``sti.store.format`` documents the files and the manifest; ``pack`` writes a store, ``Store``
reads one.
"""

from sti.store.format import BITS, FORMAT_VERSION, FP32
from sti.store.pack import pack
from sti.store.reader import EmbeddingTable, Store, is_store

__all__ = ["BITS", "FORMAT_VERSION", "FP32", "EmbeddingTable", "Store", "is_store", "pack"]
