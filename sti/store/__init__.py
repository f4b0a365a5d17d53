"""The shard store: a model cut into vertical shards, each at several fidelity versions.

    >>> from sti.store import HEAD, SOURCE, Store, pack
    >>> pack("minilm", "minilm.sti")            # checkpoint -> store directory
    >>> store = Store.open("minilm.sti")
    >>> w = store.assemble_layer(0, {0: 4, 1: 8, 5: 32})   # 3 heads of layer 0 at 4, 8, 32 bits

    >>> pack("smollm2", "smollm2.sti")          # a decoder: KV-group shards, 2..8 bits + its own Q4_1 blocks
    >>> store = Store.open("smollm2.sti")
    >>> raw = store.read_shard_bytes(3, 1, SOURCE)
    >>> store.shard_tensors_raw(3, 1, SOURCE, raw)["wo"]   # RawTensor("ggml-q4_1", (576, 192), ...)
    >>> head = store.combine_shards(HEAD, {0: store.read_shard(HEAD, 0, 4)})   # LM-head rows, 4-bit

``sti.store.format`` documents the files and the manifest; ``pack`` writes a store, ``Store``
reads one.
"""

from sti.store.format import BITS, FORMAT_VERSION, FP32, HEAD, SOURCE
from sti.store.pack import pack
from sti.store.reader import EmbeddingTable, RawTensor, Store, is_store

__all__ = ["BITS", "FORMAT_VERSION", "FP32", "HEAD", "SOURCE", "EmbeddingTable", "RawTensor", "Store", "is_store",
           "pack"]
