"""The on-disk format of a shard store: constants, the manifest dataclasses, checksums.

A store is a directory::

    STORE/
      manifest.json        written last; its presence is what makes the directory a store
      tokenizer.json       the model's tokenizer, so the store is self-contained
      globals.bin          float32: global tensors (BERT: embed.pos, embed.type, embed.ln_*;
                           LLaMA: norm) and the unsharded per-layer tensors ("layers.{i}.bo",
                           "layers.{i}.attn_norm", ... see Manifest.common)
      embeddings.bin       float32 (vocab, hidden) row-major word-embedding table, read by row,
                           then one crc32 per row (uint32 LE) to verify the rows a request reads
      shards-2bit.bin      one data file per fidelity version: every shard's 2-bit version,
      ...                  layer-major then shard index (the LM-head shards last), each starting
      shards-8bit.bin      at a multiple of ALIGNMENT (4096) bytes and zero-padded to a multiple
      shards-fp32.bin      of it, so one (O_DIRECT-able) read loads one shard version
      shards-source.bin

Fidelity versions are named by a ``bits`` code: 2, 3, 4, 5, 6, 8 (``sti.quant``'s outlier-aware
k-bit layout), ``FP32`` (32: float32) and ``SOURCE`` (33: the source checkpoint's own blocks,
e.g. a GGUF file's Q4_1 rows, copied byte for byte, so it decodes to exactly the weights the
source loads as). Codes >= FP32 are lossless; SOURCE exists only where the source has blocks
that can be cut into shards (see ``sti.store.pack``).

A shard version is ``[matrix tensors][bias tensors]`` in the order of ``Manifest.shard_tensors``,
each tensor starting at a multiple of 64 bytes (relative to the version's start). A shard tensor
is a slice of a canonical layer tensor along its output axis (rows, ``axis`` 0) or its input
axis (columns, ``axis`` 1); a column slice is stored either transposed (``transposed``: BERT's
wo and w_down, as (slice, hidden), so the encoder's kernels read contiguous rows) or as it is,
(out_rows, in_slice) row-major (LLaMA's wo and w_down: the decoder computes y = W @ x per shard
with fused matrix-vector kernels over packed rows, and GGML blocks run along a row's input
axis, so a column slice is whole blocks of every row; the shards' partial outputs add up). By
version, a matrix is stored as:

    k-bit    ``sti.quant``'s layout (``quant.to_bytes``), dtype "quant", meta ``QuantizedTensor.meta()``
    fp32     raw little-endian float32, dtype "float32"
    source   the source's blocks, dtype "ggml-<type>" (e.g. "ggml-q4_1"; "float32" for F32 tensors),
             shape (rows, cols) in weights, the bytes (rows, cols / block * block_bytes) row-major;
             meta {"ggml_type", "block", "block_bytes"}

Biases and norms are float32 in every version.

Per shard version the manifest records file, offset, padded length, checksum of those
``length`` bytes, and a *layout*: the list of (name, offset, nbytes, shape, dtype, meta) of the
tensors inside it. Layouts are shared: every shard with the same shapes at the same bitwidth
points at one entry of ``Manifest.layouts``, which keeps the manifest small.

Which slice of which canonical layer tensor a shard tensor is comes from the manifest
(``Manifest.shard_tensors`` and each shard's ``ranges``), never from names. BERT: one shard per
attention head, ranges ``attn`` (rows of wq/wk/wv, columns of wo) and ``ffn`` (rows of w_up,
columns of w_down). LLaMA: one shard per KV-head group, ranges ``attn`` (the rows of wq of the
group's query heads, the same columns of wo), ``kv`` (its K and V head's rows of wk/wv) and
``ffn`` (FFN neuron slice g of n_kv: rows of w_gate/w_up, columns of w_down).

The LM head (LLaMA; the token embedding when tied) is cut into vocabulary-row shards so that it
streams under a memory budget like the layers: shards of the pseudo-layer ``HEAD`` (-1), with
the tensors ``Manifest.head_tensors`` and the range ``vocab``, at every fidelity version.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 2  # 2: LLaMA stores (head shards, column-sliced matrices stored untransposed, source version)
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
GLOBALS_FILE = "globals.bin"
EMBED_FILE = "embeddings.bin"
ALIGNMENT = 4096  # shard versions: offset and length multiples of this (O_DIRECT, page cache)
TENSOR_ALIGN = 64  # tensors inside a shard version and in globals.bin
FP32 = 32  # the "bits" of the full-precision version
SOURCE = 33  # the "bits" of the source's own blocks (lossless, like FP32)
K_BITS = (2, 3, 4, 5, 6, 8)  # sti.quant's bitwidths
BITS = (*K_BITS, FP32)  # the versions a BERT store has by default
VERSION_NAMES = {"fp32": FP32, "source": SOURCE}  # names accepted for the lossless codes
HEAD = -1  # the pseudo-layer of the LM-head shards
DEFAULT_CHECKSUM = "sum64"


def label(bits: int) -> str:
    """A version's name for people and file names: "4-bit", "fp32", "source"."""
    names = {code: name for name, code in VERSION_NAMES.items()}
    return names.get(bits, f"{bits}-bit")


def data_file(bits: int) -> str:
    """The data file holding every shard's version at ``bits``."""
    return f"shards-{label(bits).replace('-', '')}.bin"


def align(n: int, a: int) -> int:
    return -(-n // a) * a


# Checksums are computed on every verified shard read (a streamed decoder re-reads ~100 MB per
# token); they guard against damage, not tampering. sum64 (sti.checksums) is the default: ~3x
# zlib's crc32 here (5.9 vs 2.0 GB/s per core, measured on a loaded machine), which is itself
# ~5x blake2b and ~2x sha256.
def _crc32(buf) -> str:
    return f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"


def _sum64(buf) -> str:
    from sti.checksums import sum64

    return sum64(buf)


CHECKSUMS = {
    "sum64": _sum64,
    "crc32": _crc32,
    "blake2b-128": lambda buf: hashlib.blake2b(buf, digest_size=16).hexdigest(),
    "sha256": lambda buf: hashlib.sha256(buf).hexdigest(),
}


def checksum(buf, algo: str = DEFAULT_CHECKSUM) -> str:
    return CHECKSUMS[algo](buf)


@dataclass(frozen=True)
class ShardTensor:
    """One tensor of every shard: the slice of canonical tensor ``target`` along ``axis`` (0: rows,
    1: columns) selected by the shard's range ``range``; a column slice is stored transposed
    (slice, rows) when ``transposed``, else as (rows, slice)."""

    name: str
    target: str
    range: str
    axis: int = 0
    transposed: bool = False
    quantized: bool = True  # matrices are quantized in k-bit versions; biases stay float32 everywhere

    @property
    def stored_axis(self) -> int:
        """The axis of the stored array along which shards' slices concatenate."""
        return 1 if self.axis == 1 and not self.transposed else 0


@dataclass
class TensorEntry:
    """A tensor inside a shard version (offset relative to the version's start) or in
    globals.bin (absolute offset, with its own checksum)."""

    name: str
    offset: int
    nbytes: int
    shape: list[int]
    dtype: str  # "float32" | "quant" (sti.quant layout) | "ggml-<type>" (GGML blocks); meta describes the last two
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
    family: str  # "bert" | "llama"
    config: dict  # the family config dataclass's fields
    source: dict  # model (as given), path, hash {algo, value}
    tokenizer: dict  # file, nbytes, checksum
    checksum: str  # algorithm of every checksum in the store (CHECKSUMS key)
    alignment: int
    group_size: int
    bits: list[int]  # version codes, ascending (SOURCE, FP32 or k)
    files: dict[str, int]  # data file -> size in bytes
    shard_tensors: list[ShardTensor]
    head_tensors: list[ShardTensor]  # tensors of the HEAD shards (empty: the store has no head shards)
    common: list[str]  # unsharded per-layer tensors, in globals as "layers.{i}.{name}"
    layouts: list[list[TensorEntry]]
    shards: list[ShardEntry]  # layer shards, then HEAD shards
    globals: dict[str, TensorEntry]
    embedding: EmbeddingEntry
    special: dict[str, Any] = field(default_factory=dict)  # generation: bos_id, eos_id, stop_ids, add_bos
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)  # what pack wants a reader to know (e.g. why no source version)
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
        d["head_tensors"] = [ShardTensor(**t) for t in d["head_tensors"]]
        d["layouts"] = [[TensorEntry(**t) for t in lay] for lay in d["layouts"]]
        d["shards"] = [ShardEntry(layer=s["layer"], index=s["index"], ranges=s["ranges"],
                                  versions={int(b): ShardVersion(**v) for b, v in s["versions"].items()})
                       for s in d["shards"]]
        d["globals"] = {k: TensorEntry(**t) for k, t in d["globals"].items()}
        d["embedding"] = EmbeddingEntry(**d["embedding"])
        d["bits"] = [int(b) for b in d["bits"]]
        return cls(**d)
