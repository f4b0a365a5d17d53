"""``pack``: a checkpoint -> a shard store (layout in :mod:`sti.store.format`).

Each BERT layer is cut vertically into ``num_heads`` shards. Shard (l, h) holds head h's rows of
wq/wk/wv and bq/bk/bv, head h's columns of wo stored transposed as (head_dim, hidden), FFN
neuron slice h (rows [h*F/nh, (h+1)*F/nh) of w_up and b_up) and the same columns of w_down
stored transposed as (F/nh, hidden). Every shard is written at every requested bitwidth
(matrices quantized by :mod:`sti.quant`, biases float32) and in float32.

The store is written into ``.NAME.tmp-<pid>`` beside the target, fsynced, the manifest written
last, and the directory renamed into place: an interrupted pack never leaves a directory that
:meth:`sti.store.Store.open` accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from sti.errors import STIError
from sti.store import format as fmt
from sti.store.reader import is_store

# The tensors of a BERT shard, in their order inside a shard version: matrices, then biases.
BERT_SHARD_TENSORS = (
    fmt.ShardTensor("wq", "wq", 0, "attn", True),
    fmt.ShardTensor("wk", "wk", 0, "attn", True),
    fmt.ShardTensor("wv", "wv", 0, "attn", True),
    fmt.ShardTensor("wo_t", "wo", 1, "attn", True),
    fmt.ShardTensor("w_up", "w_up", 0, "ffn", True),
    fmt.ShardTensor("w_down_t", "w_down", 1, "ffn", True),
    fmt.ShardTensor("bq", "bq", 0, "attn", False),
    fmt.ShardTensor("bk", "bk", 0, "attn", False),
    fmt.ShardTensor("bv", "bv", 0, "attn", False),
    fmt.ShardTensor("b_up", "b_up", 0, "ffn", False),
)
BERT_COMMON = ("bo", "b_down", "ln1_w", "ln1_b", "ln2_w", "ln2_b")
SHARD_TENSORS = {"bert": BERT_SHARD_TENSORS}  # family -> its shard tensors ("llama": per KV-head group, later)
HEAD_MIB = 1 << 20


def pack(model: str | Path = "minilm", out: str | Path | None = None, *,
         bits: tuple[int, ...] = fmt.BITS, progress: bool = True, overwrite: bool = False,
         group_size: int = 64, checksum: str = fmt.DEFAULT_CHECKSUM) -> Path:
    """Pack ``model`` (built-in name, HF directory) into a shard store at ``out``; returns its path.

    ``bits``: fidelity versions to write (subset of 2, 3, 4, 5, 6, 8 and 32 = float32).
    An existing ``out`` is an error unless ``overwrite`` (and then it must be an STI store)."""
    from sti.loaders import load_checkpoint

    if out is None:
        raise STIError("no output path for the store", "pass the directory to create, e.g. sti pack minilm minilm.sti")
    out = Path(out).expanduser().absolute()
    bits = _check_bits(bits)
    if checksum not in fmt.CHECKSUMS:
        raise STIError(f"unknown checksum {checksum!r}", f"use one of: {', '.join(fmt.CHECKSUMS)}")
    _check_target(out, overwrite)
    if not out.parent.is_dir():
        raise STIError(f"cannot create {out}: {out.parent} is not a directory", "create the parent directory first")
    ckpt = load_checkpoint(model, progress=progress)
    if ckpt.family not in SHARD_TENSORS:
        raise STIError(f"packing {ckpt.family} models is not supported yet",
                       "pack a BERT-family model such as minilm")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_store(ckpt, str(model), tmp, bits, group_size, checksum, progress)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_bits(bits) -> tuple[int, ...]:
    try:
        bs = tuple(sorted({int(b) for b in bits}))
    except (TypeError, ValueError):
        bs = ()
    bad = [b for b in bs if b not in fmt.BITS]
    if not bs or bad:
        raise STIError(f"bad bitwidths {bits!r}", f"choose from {', '.join(map(str, fmt.BITS))} (32 = float32)")
    return bs


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


def bert_shards(cfg, w: dict[str, np.ndarray], layer: int):
    """Yield (index, ranges, {shard tensor name: array}) for each shard of one BERT layer."""
    nh, hd, F = cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    for h in range(nh):
        a0, a1 = h * hd, (h + 1) * hd
        f0, f1 = h * F // nh, (h + 1) * F // nh
        ranges = {"attn": [a0, a1], "ffn": [f0, f1]}
        arrays = {}
        for st in BERT_SHARD_TENSORS:
            r0, r1 = ranges[st.range]
            full = w[st.target]
            arrays[st.name] = np.ascontiguousarray(full[r0:r1] if st.axis == 0 else full[:, r0:r1].T, dtype=np.float32)
        yield h, ranges, arrays


def shard_version(tensors, arrays: dict[str, np.ndarray], bits: int, group_size: int) -> tuple[bytearray, list]:
    """One shard version's bytes (padded to ALIGNMENT) and its layout (list of TensorEntry):
    ``arrays[st.name]`` for each ShardTensor ``st`` of ``tensors``, in that order."""
    from sti import quant

    parts, entries, pos = [], [], 0
    for st in tensors:
        a = arrays[st.name]
        if st.quantized and bits != fmt.FP32:
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


def _pack_shard(files, layouts, layout_ids, tensors, arrays, bits, group_size, algo) -> dict:
    """Write every version of one shard; return {bits: ShardVersion}."""
    versions = {}
    for b in bits:
        buf, entries = shard_version(tensors, arrays, b, group_size)
        key = json.dumps([dataclasses.asdict(e) for e in entries], sort_keys=True)
        if key not in layout_ids:
            layout_ids[key] = len(layouts)
            layouts.append(entries)
        f = files[b]
        off = f.put(buf, fmt.ALIGNMENT)
        versions[b] = fmt.ShardVersion(file=f.path.name, offset=off, length=len(buf),
                                       checksum=fmt.checksum(buf, algo), layout=layout_ids[key])
    return versions


def _write_store(ckpt, model: str, tmp: Path, bits, group_size: int, algo: str, progress: bool) -> fmt.Manifest:
    from tqdm import tqdm

    from sti import __version__
    from sti.models import bert

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
    names = [n for n in bert.GLOBAL_NAMES if n != "embed.word"]
    names += [f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in BERT_COMMON]
    for n in names:
        a = np.ascontiguousarray(w[n], dtype="<f4")
        blob = memoryview(a).cast("B")
        off = gfile.put(blob, fmt.TENSOR_ALIGN)
        globals_[n] = fmt.TensorEntry(n, off, a.nbytes, list(a.shape), "float32", None, fmt.checksum(blob, algo))

    # embeddings.bin: the word-embedding table, row-major, then a crc32 per row
    table = np.ascontiguousarray(w["embed.word"], dtype="<f4")
    efile = _DataFile(tmp / fmt.EMBED_FILE)
    efile.put(memoryview(table).cast("B"), 1)
    crcs = np.asarray(fmt.row_crcs(table), dtype="<u4")
    crc_off = efile.put(memoryview(crcs).cast("B"), fmt.TENSOR_ALIGN)
    embedding = fmt.EmbeddingEntry("embed.word", fmt.EMBED_FILE, 0, list(table.shape), "float32",
                                   crc_off, fmt.checksum(memoryview(crcs).cast("B"), algo))

    # shards
    files = {b: _DataFile(tmp / fmt.data_file(b)) for b in bits}
    layouts, layout_ids, shards = [], {}, []
    total = cfg.num_layers * cfg.num_heads
    with tqdm(total=total, desc="sti pack", unit="shard", file=sys.stderr, disable=not progress) as bar:
        for i in range(cfg.num_layers):
            lw = bert.layer_weights(w, i)
            for h, ranges, arrays in bert_shards(cfg, lw, i):
                versions = _pack_shard(files, layouts, layout_ids, BERT_SHARD_TENSORS, arrays, bits, group_size, algo)
                shards.append(fmt.ShardEntry(layer=i, index=h, ranges=ranges, versions=versions))
                bar.update(1)

    sizes = {fmt.GLOBALS_FILE: gfile.close(), fmt.EMBED_FILE: efile.close()}
    for b, f in files.items():
        sizes[f.path.name] = f.close()
    manifest = fmt.Manifest(
        format_version=fmt.FORMAT_VERSION, sti_version=__version__, family=ckpt.family,
        config=dataclasses.asdict(cfg),
        source={"model": model, "path": str(src), "hash": source_fingerprint(src)},
        tokenizer=tokenizer, checksum=algo, alignment=fmt.ALIGNMENT, group_size=group_size,
        bits=list(bits), files=sizes, shard_tensors=list(BERT_SHARD_TENSORS), common=list(BERT_COMMON),
        layouts=layouts, shards=shards, globals=globals_, embedding=embedding,
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
