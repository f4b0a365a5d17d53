"""The on-disk format of a shard store: constants, the manifest dataclasses, checksums.

A store is a directory::

    STORE/
      manifest.json        written last; its presence is what makes the directory a store
      tokenizer.json       the model's tokenizer, so the store is self-contained
      globals.bin          float32: global tensors (embed.pos, embed.type, embed.ln_*) and the
                           unsharded per-layer tensors ("layers.{i}.bo", ... see Manifest.common)
      embeddings.bin       float32 (vocab, hidden) row-major word-embedding table, read by row,
                           then one crc32 per row (uint32 LE) to verify the rows a request reads
      shards-2bit.bin      one data file per fidelity version: every shard's 2-bit version,
      ...                  layer-major then shard index, each starting at a multiple of
      shards-8bit.bin      ALIGNMENT (4096) bytes and zero-padded to a multiple of it, so one
      shards-fp32.bin      (O_DIRECT-able) read loads one shard version

A shard version is ``[matrix tensors][bias tensors]`` in the order of ``Manifest.shard_tensors``,
each tensor starting at a multiple of 64 bytes (relative to the version's start). Matrices are
stored row-major as (rows, hidden): slices taken along a weight's input axis (BERT's wo and
w_down columns) are stored transposed, so every matrix is row-contiguous. In k-bit versions a
matrix is the ``sti.quant`` layout (``quant.to_bytes``, described by ``QuantizedTensor.meta()``);
in the fp32 version (bits = 32) and for biases it is raw little-endian float32.

Per shard version the manifest records file, offset, padded length, checksum of those
``length`` bytes, and a *layout*: the list of (name, offset, nbytes, shape, dtype, quantizer
meta) of the tensors inside it. Layouts are shared: every shard with the same shapes at the
same bitwidth points at one entry of ``Manifest.layouts``, which keeps the manifest small.

Which slice of which canonical layer tensor a shard tensor is comes from the manifest
(``Manifest.shard_tensors`` and each shard's ``ranges``), never from names: BERT shards have
the ranges ``attn`` (rows of wq/wk/wv, columns of wo) and ``ffn`` (rows of w_up, columns of
w_down). A LLaMA store will add a ``kv`` range (a shard is one KV-head group: its query heads,
its K/V head, the matching wo columns, and an FFN neuron slice of w_gate/w_up/w_down).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
GLOBALS_FILE = "globals.bin"
EMBED_FILE = "embeddings.bin"
ALIGNMENT = 4096  # shard versions: offset and length multiples of this (O_DIRECT, page cache)
TENSOR_ALIGN = 64  # tensors inside a shard version and in globals.bin
FP32 = 32  # the "bits" of the full-precision version
BITS = (2, 3, 4, 5, 6, 8, FP32)
DEFAULT_CHECKSUM = "crc32"


def data_file(bits: int) -> str:
    """The data file holding every shard's version at ``bits``."""
    return "shards-fp32.bin" if bits == FP32 else f"shards-{bits}bit.bin"


def align(n: int, a: int) -> int:
    return -(-n // a) * a


# crc32 is ~5x faster than blake2b here (3.6 vs 0.85 GB/s; sha256 1.8 GB/s) and checksums are
# computed on every verified shard read; they guard against damage, not tampering.
def _crc32(buf) -> str:
    return f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"


CHECKSUMS = {
    "crc32": _crc32,
    "blake2b-128": lambda buf: hashlib.blake2b(buf, digest_size=16).hexdigest(),
    "sha256": lambda buf: hashlib.sha256(buf).hexdigest(),
}


def checksum(buf, algo: str = DEFAULT_CHECKSUM) -> str:
    return CHECKSUMS[algo](buf)


@dataclass(frozen=True)
class ShardTensor:
    """One tensor of every shard: the slice of canonical layer tensor ``target`` along ``axis``
    (1: stored transposed) selected by the shard's range ``range``."""

    name: str
    target: str
    axis: int
    range: str
    quantized: bool  # matrices are quantized in k-bit versions; biases stay float32 everywhere


@dataclass
class TensorEntry:
    """A tensor inside a shard version (offset relative to the version's start) or in
    globals.bin (absolute offset, with its own checksum)."""

    name: str
    offset: int
    nbytes: int
    shape: list[int]
    dtype: str  # "float32" | "quant" (sti.quant layout, described by meta)
    meta: dict | None = None
    checksum: str | None = None


@dataclass
class ShardVersion:
    file: str
    offset: int
    length: int  # multiple of ALIGNMENT, padding included; the checksum covers all of it
    checksum: str
    layout: int  # index into Manifest.layouts


@dataclass
class ShardEntry:
    layer: int
    index: int
    ranges: dict[str, list[int]]  # range name -> [start, stop) along the target axis
    versions: dict[int, ShardVersion]  # bits -> where that version lies


@dataclass
class EmbeddingEntry:
    """The word-embedding table: ``shape`` (vocab, hidden) float32 rows at ``offset`` in ``file``,
    followed at ``row_crc_offset`` by one crc32 per row (uint32 little-endian), so a read of a
    few rows can be verified without reading more; ``row_crc_checksum`` covers that array."""

    name: str  # canonical name, "embed.word"
    file: str
    offset: int
    shape: list[int]  # (vocab, hidden)
    dtype: str  # "float32"
    row_crc_offset: int
    row_crc_checksum: str

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * 4

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes


def row_crcs(table) -> "list[int]":
    """crc32 of each row of a C-contiguous 2-D array."""
    mv = memoryview(table).cast("B")
    n = table.shape[1] * table.itemsize
    return [zlib.crc32(mv[i * n: (i + 1) * n]) for i in range(table.shape[0])]


@dataclass
class Manifest:
    format_version: int
    sti_version: str
    family: str  # "bert" (later "llama")
    config: dict  # the family config dataclass's fields
    source: dict  # model (as given), path, hash {algo, value}
    tokenizer: dict  # file, nbytes, checksum
    checksum: str  # algorithm of every checksum in the store (CHECKSUMS key)
    alignment: int
    group_size: int
    bits: list[int]
    files: dict[str, int]  # data file -> size in bytes
    shard_tensors: list[ShardTensor]
    common: list[str]  # unsharded per-layer tensors, in globals as "layers.{i}.{name}"
    layouts: list[list[TensorEntry]]
    shards: list[ShardEntry]
    globals: dict[str, TensorEntry]
    embedding: EmbeddingEntry
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shards"] = [{**s, "versions": {str(b): v for b, v in s["versions"].items()}} for s in d["shards"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """Parse a manifest dict (format_version already checked). Raises KeyError/TypeError/
        ValueError on a malformed manifest; the reader turns those into an STIError."""
        d = dict(d)
        d["shard_tensors"] = [ShardTensor(**t) for t in d["shard_tensors"]]
        d["layouts"] = [[TensorEntry(**t) for t in lay] for lay in d["layouts"]]
        d["shards"] = [ShardEntry(layer=s["layer"], index=s["index"], ranges=s["ranges"],
                                  versions={int(b): ShardVersion(**v) for b, v in s["versions"].items()})
                       for s in d["shards"]]
        d["globals"] = {k: TensorEntry(**t) for k, t in d["globals"].items()}
        d["embedding"] = EmbeddingEntry(**d["embedding"])
        d["bits"] = [int(b) for b in d["bits"]]
        return cls(**d)
