"""Model families, one per file: a config dataclass, checkpoint name maps, and the forward
pass as functions that take their weights per layer (weights are never owned by objects, so a
runtime can feed a layer from memory, from a shard store, or with only some of its shards)."""
