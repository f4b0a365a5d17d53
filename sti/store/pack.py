"""``pack``: a checkpoint -> a shard store (layout in :mod:`sti.store.format`).

Each layer is cut vertically into shards as its family's :class:`FamilyLayout` says:

- BERT: one shard per attention head. Shard (l, h) holds head h's rows of wq/wk/wv and
  bq/bk/bv, head h's columns of wo stored transposed as (head_dim, hidden), FFN neuron slice h
  (rows [h*F/nh, (h+1)*F/nh) of w_up and b_up) and the same columns of w_down stored transposed
  as (F/nh, hidden).
- LLaMA: one shard per KV-head group. Shard (l, g) holds the rows of wq of the group's query
  heads, its K and V head's rows of wk/wv, the same query columns of wo as (hidden,
  group_size*head_dim), FFN neuron slice g of n_kv (rows of w_gate and w_up, the same columns of
  w_down as (hidden, F/n_kv)). The LM head (the token embedding when tied) is cut into
  ``head_shards`` vocabulary-row shards of the pseudo-layer ``HEAD``.

Every shard is written at every requested version: k bits (matrices quantized by
:mod:`sti.quant`, biases float32), float32, and for a GGUF source the source's own blocks
(``SOURCE``): each matrix's rows copied byte for byte, wq/wk rows put back in the order the
loader un-permutes them to (rows are independent, so reordering block rows is lossless), and
column slices taken as whole blocks of each row. A model whose slices do not fall on block
boundaries (or whose source is not a GGUF file) gets no source version: an error when it was
asked for, else a note in the manifest.

The store is written into ``.NAME.tmp-<pid>`` beside the target, fsynced, the manifest written
last, and the directory renamed into place: an interrupted pack never leaves a directory that
:meth:`sti.store.Store.open` accepts.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass, field
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sti.errors import STIError
from sti.store import format as fmt
from sti.store.reader import is_store

ST = fmt.ShardTensor
K_BITS = fmt.K_BITS
HEAD_SHARDS = 48  # LM-head shards: SmolLM2's 30 MB Q8_0 head streams in 0.63 MB pieces, about a
# layer shard's size, so the decoder's read buffers (all as large as the largest streamed shard) waste little
HEAD_MIB = 1 << 20
M_TOP_PAD, HEAP_PAD = -2, 64 << 20  # glibc mallopt: free memory kept at the top of the heap


def _bert_ranges(cfg) -> list[dict[str, list[int]]]:
    nh, hd, F = cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    return [{"attn": [h * hd, (h + 1) * hd], "ffn": [h * F // nh, (h + 1) * F // nh]} for h in range(nh)]


def _llama_ranges(cfg) -> list[dict[str, list[int]]]:
    n, hd, F = cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    q = cfg.group_size * hd  # query rows of one KV-head group
    return [{"attn": [g * q, (g + 1) * q], "kv": [g * hd, (g + 1) * hd], "ffn": [g * F // n, (g + 1) * F // n]}
            for g in range(n)]


@dataclass(frozen=True)
class FamilyLayout:
    """How a model family's canonical weights map onto a store."""

    shard_tensors: tuple[fmt.ShardTensor, ...]  # in their order inside a shard version: matrices, then biases
    shard_ranges: Callable  # config -> one {range: [start, stop)} per shard of a layer
    common: tuple[str, ...]  # unsharded per-layer tensors (globals.bin)
    globals: tuple[str, ...]  # global tensors (globals.bin)
    embedding: str  # the word-embedding table (embeddings.bin)
    head_tensors: tuple[fmt.ShardTensor, ...] = ()  # LM-head shards, cut along the vocabulary
    tied: dict = field(default_factory=dict)  # tensor -> the one it is when the checkpoint lacks it
    default_bits: tuple[int, ...] = fmt.BITS


BERT = FamilyLayout(
    shard_tensors=(
        ST("wq", "wq", "attn"), ST("wk", "wk", "attn"), ST("wv", "wv", "attn"),
        ST("wo_t", "wo", "attn", axis=1, transposed=True),
        ST("w_up", "w_up", "ffn"), ST("w_down_t", "w_down", "ffn", axis=1, transposed=True),
        ST("bq", "bq", "attn", quantized=False), ST("bk", "bk", "attn", quantized=False),
        ST("bv", "bv", "attn", quantized=False), ST("b_up", "b_up", "ffn", quantized=False),
    ),
    shard_ranges=_bert_ranges,
    common=("bo", "b_down", "ln1_w", "ln1_b", "ln2_w", "ln2_b"),
    globals=("embed.pos", "embed.type", "embed.ln_w", "embed.ln_b"),
    embedding="embed.word",
)
# Column slices (wo, w_down) stay (out, in_slice): the decoder's matrix-vector kernels read rows,
# GGML blocks run along them, and the shards' partial outputs add up.
LLAMA = FamilyLayout(
    shard_tensors=(
        ST("wq", "wq", "attn"), ST("wk", "wk", "kv"), ST("wv", "wv", "kv"), ST("wo", "wo", "attn", axis=1),
        ST("w_gate", "w_gate", "ffn"), ST("w_up", "w_up", "ffn"), ST("w_down", "w_down", "ffn", axis=1),
    ),
    shard_ranges=_llama_ranges,
    common=("attn_norm", "ffn_norm"),
    globals=("norm",),
    embedding="embed",
    head_tensors=(ST("lm_head", "lm_head", "vocab"),),
    tied={"lm_head": "embed"},
    default_bits=(*K_BITS, fmt.SOURCE),  # float32 SmolLM2 would be 540 MB; its lossless version is Q4_1
)
FAMILIES = {"bert": BERT, "llama": LLAMA}


def pack(model: str | Path = "minilm", out: str | Path | None = None, *,
         bits: tuple[int | str, ...] | None = None, progress: bool = True, overwrite: bool = False,
         group_size: int = 64, checksum: str = fmt.DEFAULT_CHECKSUM, head_shards: int = HEAD_SHARDS) -> Path:
    """Pack ``model`` (built-in name, HF directory, GGUF file) into a shard store at ``out``; returns its path.

    ``bits``: fidelity versions to write, from 2, 3, 4, 5, 6, 8, 32 (or "fp32") and 33 (or
    "source"); None takes the family's default (BERT: 2..8 and fp32; LLaMA: 2..8 and source, or
    without source, with a note, where the model has none). ``head_shards``: vocabulary-row
    shards of a decoder's LM head. An existing ``out`` is an error unless ``overwrite`` (and
    then it must be an STI store)."""
    from sti.loaders import load_checkpoint

    if out is None:
        raise STIError("no output path for the store", "pass the directory to create, e.g. sti pack minilm -o minilm.sti")
    out = Path(out).expanduser().absolute()
    if bits is not None:
        bits = _check_bits(bits)
    if checksum not in fmt.CHECKSUMS:
        raise STIError(f"unknown checksum {checksum!r}", f"use one of: {', '.join(fmt.CHECKSUMS)}")
    if not isinstance(head_shards, int) or head_shards < 1:
        raise STIError(f"bad number of LM-head shards {head_shards!r}",
                       f"pass a positive integer (default {HEAD_SHARDS})")
    _check_target(out, overwrite)
    if not out.parent.is_dir():
        raise STIError(f"cannot create {out}: {out.parent} is not a directory", "create the parent directory first")
    ckpt = load_checkpoint(model, progress=progress)
    _keep_heap_pad()
    family = FAMILIES.get(ckpt.family)
    if family is None:
        raise STIError(f"packing {ckpt.family} models is not supported", f"pack a model of: {', '.join(FAMILIES)}")
    notes: list[str] = []
    bits, source = _versions(ckpt, family, bits, notes)
    for n in notes if progress else ():
        print(f"sti: note: {n}", file=sys.stderr)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_store(ckpt, family, source, str(model), tmp, bits, group_size, checksum, head_shards, notes, progress)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _keep_heap_pad() -> None:
    """Keep HEAP_PAD bytes of freed memory at the top of the heap, for the rest of the process.
    glibc otherwise hands the quantizer's temporaries (a few MB each for a decoder's shards) back
    to the OS after every call and faults them in again on the next: measured on SmolLM2, half
    of the pack's CPU time (74 of 143 s) was spent in the kernel doing that. A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_TOP_PAD, HEAP_PAD)


def _check_bits(bits) -> tuple[int, ...]:
    """Version codes, ascending, from ints and the names of :data:`fmt.VERSION_NAMES`."""
    allowed = (*K_BITS, fmt.FP32, fmt.SOURCE)

    def code(b) -> int:
        name = b.strip().lower() if isinstance(b, str) else None
        return fmt.VERSION_NAMES[name] if name in fmt.VERSION_NAMES else int(b)

    try:
        bs = tuple(sorted({code(b) for b in bits}))
    except (TypeError, ValueError):
        bs = ()
    if not bs or any(b not in allowed for b in bs):
        raise STIError(f"bad bitwidths {bits!r}",
                       f"choose from {', '.join(map(str, K_BITS))}, 32 (fp32) and 33 (source: the source's own blocks)")
    return bs


def _versions(ckpt, family: FamilyLayout, bits, notes: list[str]):
    """(the version codes to write, the source's blocks or None). Without explicit ``bits``, a
    model with no source version gets the family's default without it, and a note."""
    asked = bits is not None
    bits = bits if asked else family.default_bits
    if fmt.SOURCE not in bits:
        return bits, None
    try:
        return bits, SourceBlocks.open(ckpt, family)
    except STIError as exc:
        if asked:
            raise
        notes.append(f"no source version: {exc.problem}")
        return tuple(b for b in bits if b != fmt.SOURCE), None


def _check_target(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise STIError(f"{out} already exists", "choose another path, or overwrite the store (--overwrite)")
    if not (is_store(out) or (out.is_dir() and not any(out.iterdir()))):
        raise STIError(f"{out} exists and is not an STI store; refusing to replace it",
                       "remove it yourself or choose another path")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp dir into place (replacing an old store if ``overwrite``)."""
    old = None
    if out.exists() or out.is_symlink():
        _check_target(out, overwrite)  # it may have appeared while we packed
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DataFile:
    """An append-only data file that hands out aligned offsets."""

    def __init__(self, path: Path):
        self.path, self.f, self.pos = path, open(path, "wb"), 0

    def put(self, buf, alignment: int) -> int:
        """Write ``buf`` at the next multiple of ``alignment``; return its offset."""
        start = fmt.align(self.pos, alignment)
        if start > self.pos:
            self.f.write(bytes(start - self.pos))
        self.f.write(buf)
        self.pos = start + memoryview(buf).nbytes
        return start

    def close(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.pos


def source_fingerprint(path: Path) -> dict:
    """A fast hash of a model source: sha256 over each file's name, size, first and last MiB
    (a directory: its config, tokenizer and weight files)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file()
                       and (p.suffix == ".safetensors" or p.name in ("config.json", "tokenizer.json",
                                                                       "model.safetensors.index.json")))
    else:
        files = [path]
    h = hashlib.sha256()
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(HEAD_MIB))
            if size > HEAD_MIB:
                fh.seek(max(HEAD_MIB, size - HEAD_MIB))
                h.update(fh.read())
    return {"algo": "sha256-head-tail-1MiB", "value": h.hexdigest(), "bytes": total, "files": [f.name for f in files]}


def cut(full: np.ndarray, st: fmt.ShardTensor, r0: int, r1: int) -> np.ndarray:
    """Shard tensor ``st`` of range [r0, r1) of the canonical tensor ``full``, as stored (C-contiguous)."""
    part = full[r0:r1] if st.axis == 0 else full[:, r0:r1]
    return np.ascontiguousarray(part.T if st.transposed else part)


@dataclass(frozen=True)
class Blocks:
    """A matrix as a GGML file holds it: ``data`` (rows, cols / block * block_bytes) uint8, each
    row a run of blocks of ``block`` weights along the input axis."""

    ggml_type: str  # a GGMLQuantizationType name, "Q4_1"
    shape: tuple[int, int]  # (rows, cols) in weights
    data: np.ndarray

    @property
    def block(self) -> tuple[int, int]:
        """(weights, bytes) of one block."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType[self.ggml_type]]

    def columns(self, st: fmt.ShardTensor, r0: int, r1: int, what: str) -> slice:
        """The bytes of each row that hold columns [r0, r1) of shard tensor ``st``; an STIError
        naming ``what`` unless they are whole blocks stored untransposed."""
        n, size = self.block
        if st.transposed or r0 % n or r1 % n:
            raise STIError(f"{what} is {self.ggml_type}, whose blocks of {n} weights run along a row, and its shard "
                           f"slice of columns [{r0}, {r1}) is not whole blocks",
                           "pack without the source version (--bits 2,3,4,5,6,8 or add 32 for float32)")
        return slice(r0 // n * size, r1 // n * size)

    def cut(self, st: fmt.ShardTensor, r0: int, r1: int, what: str) -> "Blocks":
        """Like :func:`cut` (see :meth:`columns` for column slices)."""
        if st.axis == 0:
            return Blocks(self.ggml_type, (r1 - r0, self.shape[1]), np.ascontiguousarray(self.data[r0:r1]))
        part = self.data[:, self.columns(st, r0, r1, what)]
        return Blocks(self.ggml_type, (self.shape[0], r1 - r0), np.ascontiguousarray(part))

    def entry(self) -> tuple[str, dict | None]:
        """(TensorEntry dtype, meta) of these blocks in a store (format.py)."""
        if self.ggml_type == "F32":
            return "float32", None
        n, size = self.block
        return f"ggml-{self.ggml_type.lower()}", {"ggml_type": self.ggml_type, "block": n, "block_bytes": size}


class SourceBlocks:
    """A GGUF source's matrices as :class:`Blocks` in canonical (un-permuted) row order, for the
    source version. :meth:`open` checks up front that every shard of every layer can be cut."""

    def __init__(self, gguf_file, cfg, family: FamilyLayout):
        self.f, self.cfg, self.family = gguf_file, cfg, family

    @classmethod
    def open(cls, ckpt, family: FamilyLayout) -> "SourceBlocks":
        from sti.loaders.gguf import SUPPORTED_TYPES, read_gguf

        src = Path(ckpt.source)
        if not src.is_file():  # load_checkpoint reads files as GGUF
            raise STIError(f"the source {src} is not a GGUF file, so it has no blocks to keep; its lossless "
                           "version is float32", "pack with --bits 2,3,4,5,6,8,32")
        self = cls(read_gguf(src), ckpt.config, family)
        supported = {t.name for t in SUPPORTED_TYPES}
        ranges = family.shard_ranges(self.cfg)
        groups = [(i, family.shard_tensors) for i in range(self.cfg.num_layers)] + [(None, family.head_tensors)]
        for layer, tensors in groups:
            for st in tensors:
                info = self.f.tensors[self.gguf_name(st.target, layer)]
                if info.type_name not in supported:
                    raise STIError(f"tensor {info.name} is {info.type_name}, which STI cannot decode",
                                   f"use a GGUF file quantized to one of: {', '.join(sorted(supported))}")
                for r in ranges if st.axis == 1 else ():
                    Blocks(info.type_name, info.shape, self.f.raw(info.name)).columns(
                        st, *r[st.range], what=f"tensor {info.name}")
        return self

    def gguf_name(self, target: str, layer: int | None = None) -> str:
        from sti.models.llama import GGUF_NAMES

        key = target if layer is None else f"layers.{{i}}.{target}"
        name = GGUF_NAMES[key].format(i=layer)
        if name not in self.f.tensors and target in self.family.tied:
            return self.gguf_name(self.family.tied[target], layer)
        return name

    def tensor(self, target: str, layer: int | None = None) -> Blocks:
        """The canonical tensor ``target`` (of ``layer``) as blocks, wq/wk rows un-permuted."""
        from sti.loaders.gguf import unpermute_rope
        from sti.models.llama import GGUF_ROPE_PERMUTED

        info = self.f.tensors[self.gguf_name(target, layer)]
        data = self.f.raw(info.name)
        heads = GGUF_ROPE_PERMUTED.get(f"layers.{{i}}.{target}")
        if heads:
            data = unpermute_rope(data, getattr(self.cfg, heads))
        return Blocks(info.type_name, info.shape, data)


def shard_version(tensors, arrays, bits: int, group_size: int) -> tuple[bytearray, list]:
    """One shard version's bytes (padded to ALIGNMENT) and its layout (list of TensorEntry):
    ``arrays[st.name]`` for each ShardTensor ``st`` of ``tensors``, in that order; float32 arrays
    are quantized (matrices at k bits) or written raw, :class:`Blocks` are copied as they are."""
    from sti import quant

    parts, entries, pos = [], [], 0
    for st in tensors:
        a = arrays[st.name]
        if isinstance(a, Blocks):
            (dtype, meta), blob = a.entry(), a.data.tobytes()
        elif st.quantized and bits in K_BITS:
            q = quant.quantize(a, bits, group_size)
            blob, meta, dtype = quant.to_bytes(q), q.meta(), "quant"
        else:
            blob, meta, dtype = a.astype("<f4", copy=False).tobytes(), None, "float32"
        pos = fmt.align(pos, fmt.TENSOR_ALIGN)
        entries.append(fmt.TensorEntry(st.name, pos, len(blob), list(a.shape), dtype, meta))
        parts.append((pos, blob))
        pos += len(blob)
    buf = bytearray(fmt.align(max(pos, 1), fmt.ALIGNMENT))
    for p, blob in parts:
        buf[p: p + len(blob)] = blob
    return buf, entries


def _pack_shard(files, layouts, layout_ids, tensors, arrays, source, bits, group_size, algo) -> dict:
    """Write every version of one shard (``source``: its SOURCE tensors, or None); return {bits: ShardVersion}."""
    versions = {}
    for b in bits:
        buf, entries = shard_version(tensors, source if b == fmt.SOURCE else arrays, b, group_size)
        key = json.dumps([dataclasses.asdict(e) for e in entries], sort_keys=True)
        if key not in layout_ids:
            layout_ids[key] = len(layouts)
            layouts.append(entries)
        f = files[b]
        off = f.put(buf, fmt.ALIGNMENT)
        versions[b] = fmt.ShardVersion(file=f.path.name, offset=off, length=len(buf),
                                       checksum=fmt.checksum(buf, algo), layout=layout_ids[key])
    return versions


def _shard_plan(ckpt, family: FamilyLayout, source: SourceBlocks | None, head_shards: int):
    """(number of shards, iterator of (layer, index, ranges, tensors, {name: float32}, {name: Blocks} or None))
    over every layer's shards, then the HEAD shards; one layer's tensors are looked up at a time."""
    cfg, w = ckpt.config, ckpt.weights

    def weight(target: str, layer: int | None):
        key = target if layer is None else f"layers.{layer}.{target}"
        return w[key] if key in w or target not in family.tied else weight(family.tied[target], layer)

    groups = [(i, family.shard_tensors, family.shard_ranges(cfg)) for i in range(cfg.num_layers)]
    if family.head_tensors:
        V = cfg.vocab_size
        n = min(head_shards, V)
        groups.append((fmt.HEAD, family.head_tensors, [{"vocab": [k * V // n, (k + 1) * V // n]} for k in range(n)]))

    def shards():
        for layer, tensors, ranges in groups:
            at = None if layer == fmt.HEAD else layer
            full = {st.name: weight(st.target, at) for st in tensors}
            blocks = {st.name: source.tensor(st.target, at) for st in tensors if st.quantized} if source else None
            for index, r in enumerate(ranges):
                arrays = {st.name: cut(full[st.name], st, *r[st.range]) for st in tensors}
                src = None if blocks is None else {
                    st.name: blocks[st.name].cut(st, *r[st.range], what=st.target) if st.name in blocks
                    else arrays[st.name] for st in tensors}
                yield layer, index, r, tensors, arrays, src

    return sum(len(r) for _, _, r in groups), shards()


def _write_store(ckpt, family: FamilyLayout, source, model: str, tmp: Path, bits, group_size: int, algo: str,
                 head_shards: int, notes: list[str], progress: bool) -> fmt.Manifest:
    from tqdm import tqdm

    from sti import __version__

    cfg, w = ckpt.config, ckpt.weights
    src = Path(ckpt.source)

    # tokenizer: the source's own file when there is one, else the loaded tokenizer serialized
    tok_src = src / "tokenizer.json" if src.is_dir() else None
    tok_bytes = (tok_src.read_bytes() if tok_src is not None and tok_src.is_file()
                 else ckpt.tokenizer.to_str().encode())
    (tmp / fmt.TOKENIZER).write_bytes(tok_bytes)
    _fsync(tmp / fmt.TOKENIZER)
    tokenizer = {"file": fmt.TOKENIZER, "nbytes": len(tok_bytes), "checksum": fmt.checksum(tok_bytes, algo)}

    # globals.bin: global tensors, then each layer's unsharded tensors
    gfile = _DataFile(tmp / fmt.GLOBALS_FILE)
    globals_ = {}
    names = list(family.globals) + [f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in family.common]
    for n in names:
        a = np.ascontiguousarray(w[n], dtype="<f4")
        blob = memoryview(a).cast("B")
        off = gfile.put(blob, fmt.TENSOR_ALIGN)
        globals_[n] = fmt.TensorEntry(n, off, a.nbytes, list(a.shape), "float32", None, fmt.checksum(blob, algo))

    # embeddings.bin: the word-embedding table, row-major, then a crc32 per row
    table = np.ascontiguousarray(w[family.embedding], dtype="<f4")
    efile = _DataFile(tmp / fmt.EMBED_FILE)
    efile.put(memoryview(table).cast("B"), 1)
    crcs = np.asarray(fmt.row_crcs(table), dtype="<u4")
    crc_off = efile.put(memoryview(crcs).cast("B"), fmt.TENSOR_ALIGN)
    embedding = fmt.EmbeddingEntry(family.embedding, fmt.EMBED_FILE, 0, list(table.shape), "float32",
                                   crc_off, fmt.checksum(memoryview(crcs).cast("B"), algo))

    # shards: every layer's, then the LM head's
    files = {b: _DataFile(tmp / fmt.data_file(b)) for b in bits}
    layouts, layout_ids, shards = [], {}, []
    total, plan = _shard_plan(ckpt, family, source, head_shards)
    with tqdm(total=total, desc="sti pack", unit="shard", file=sys.stderr, disable=not progress) as bar:
        for layer, index, ranges, tensors, arrays, src_arrays in plan:
            versions = _pack_shard(files, layouts, layout_ids, tensors, arrays, src_arrays, bits, group_size, algo)
            shards.append(fmt.ShardEntry(layer=layer, index=index, ranges=ranges, versions=versions))
            bar.update(1)

    sizes = {fmt.GLOBALS_FILE: gfile.close(), fmt.EMBED_FILE: efile.close()}
    for b, f in files.items():
        sizes[f.path.name] = f.close()
    manifest = fmt.Manifest(
        format_version=fmt.FORMAT_VERSION, sti_version=__version__, family=ckpt.family,
        config=dataclasses.asdict(cfg),
        source={"model": model, "path": str(src), "hash": source_fingerprint(src)},
        tokenizer=tokenizer, checksum=algo, alignment=fmt.ALIGNMENT, group_size=group_size,
        bits=list(bits), files=sizes, shard_tensors=list(family.shard_tensors),
        head_tensors=list(family.head_tensors), common=list(family.common),
        layouts=layouts, shards=shards, globals=globals_, embedding=embedding,
        special=dict(ckpt.special), chat_template=ckpt.chat_template, notes=list(notes),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_manifest(tmp, manifest)
    return manifest


def _write_manifest(tmp: Path, manifest: fmt.Manifest) -> None:
    """The manifest goes last: until it is there the directory is not a store."""
    data = json.dumps(manifest.to_dict(), separators=(",", ":")).encode()
    with open(tmp / fmt.MANIFEST, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
