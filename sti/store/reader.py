"""``Store``: read a shard store (layout in :mod:`sti.store.format`).

Reads are ``os.pread`` on file descriptors opened once, so one ``Store`` can serve an IO
thread and a compute thread at the same time. The split an elastic runtime needs is:
``read_shard_bytes`` (IO: one contiguous, 4096-aligned read), ``check_shard`` (checksum) and
``decode_shard`` (dequantize to float32), then ``combine_shards`` (the canonical layer dict that
``sti.models.bert.layer`` runs at whatever width it is given). ``read_shard`` and
``assemble_layer`` do it all in one call.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sti.errors import STIError
from sti.store import format as fmt

_REPACK = "re-pack the store: sti pack MODEL STORE --overwrite"


def is_store(path: str | Path) -> bool:
    """Whether ``path`` looks like a shard store (a directory with a manifest); cheap, no validation."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / fmt.MANIFEST).is_file()


def _label(bits: int) -> str:
    return "fp32" if bits == fmt.FP32 else f"{bits}-bit"


def _config(family: str, d: dict):
    if family == "bert":
        from sti.models.bert import BertConfig

        return BertConfig(**d)
    if family == "llama":
        from sti.models.llama import LlamaConfig

        return LlamaConfig(**d)
    raise STIError(f"the store holds an unknown model family {family!r}", "re-pack it with this STI")


class EmbeddingTable:
    """The store's word-embedding table as an indexable object: ``table[ids]`` reads only the
    rows of ``ids`` (any integer shape) and returns ``ids.shape + (hidden,)`` float32. It stands
    in for ``embed.word`` in ``sti.models.bert.embed``, so the table is never resident."""

    def __init__(self, store: "Store"):
        self._store = store
        self.shape = tuple(store.manifest.embedding.shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return self._store.embedding_rows(ids.reshape(-1)).reshape(ids.shape + (self.shape[1],))


class Store:
    """An open shard store. Create with :meth:`Store.open`; close with :meth:`close` (or ``with``)."""

    def __init__(self, path: Path, manifest: fmt.Manifest):
        self.path = path
        self.manifest = manifest
        self.family = manifest.family
        self.config = _config(manifest.family, manifest.config)
        self.bits = tuple(manifest.bits)
        self._shards = {(s.layer, s.index): s for s in manifest.shards}
        self._by_layer: dict[int, list[int]] = {}
        for s in manifest.shards:
            self._by_layer.setdefault(s.layer, []).append(s.index)
        self.num_layers = len(self._by_layer)
        self._fds: dict[str, int] = {}
        for name in manifest.files:
            fd = self._fds[name] = os.open(path / name, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # shard reads hop between files: read-ahead only wastes IO
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._lock = threading.Lock()
        self._globals_buf: bytes | None = None
        self._checked: set[str] = set()
        self._row_crcs: np.ndarray | None = None
        self._decoders: dict = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open and validate a store: manifest present and of this format version, data files
        present with the sizes the manifest records."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise STIError(f"no such store: {path}", "create it with: sti pack MODEL STORE")
        mpath = path / fmt.MANIFEST
        if not mpath.is_file():
            if re.fullmatch(r"\..+\.(tmp|old)-\d+", path.name):
                raise STIError(f"{path} is not an STI store (no manifest.json): it is left over from an "
                               "interrupted sti pack", "delete it and run sti pack again")
            raise STIError(f"{path} is not an STI store (no manifest.json)", "run sti pack MODEL STORE to create one")
        try:
            d = json.loads(mpath.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise STIError(f"{mpath} is damaged: not valid JSON ({exc})", _REPACK) from None
        if not isinstance(d, dict) or "format_version" not in d:
            raise STIError(f"{mpath} is not an STI store manifest (no format_version)", _REPACK)
        v = d["format_version"]
        if v != fmt.FORMAT_VERSION:
            from sti import __version__

            raise STIError(f"{path} has store format version {v}, but this STI ({__version__}) reads "
                           f"format version {fmt.FORMAT_VERSION}",
                           f"re-pack the store with this STI: sti pack MODEL {path} --overwrite")
        try:
            manifest = fmt.Manifest.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise STIError(f"{mpath} is damaged: malformed manifest ({type(exc).__name__}: {exc})", _REPACK) from None
        if manifest.checksum not in fmt.CHECKSUMS:
            raise STIError(f"{mpath} uses checksum {manifest.checksum!r}, unknown to this STI", _REPACK)
        for name, size in {**manifest.files, manifest.tokenizer["file"]: manifest.tokenizer["nbytes"]}.items():
            f = path / name
            if not f.is_file():
                raise STIError(f"store file {f} is missing (expected {size} bytes)", _REPACK)
            got = f.stat().st_size
            if got != size:
                what = "truncated" if got < size else "larger than recorded"
                raise STIError(f"store file {f} is {what}: {got} bytes, expected {size}", _REPACK)
        return cls(path, manifest)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, {self.family}, {self.num_layers} layers, bits {self.bits})"

    # ------------------------------------------------------------------ low-level reads

    def _pread(self, name: str, nbytes: int, offset: int, out=None):
        fd = self._fds.get(name)
        if fd is None:
            raise STIError(f"store {self.path} is closed", "open it again with Store.open")
        if out is None:
            buf = os.pread(fd, nbytes, offset)
            got = len(buf)
        else:
            buf = out
            got = os.preadv(fd, [memoryview(out).cast("B")[:nbytes]], offset)
        if got != nbytes:
            raise STIError(f"store file {self.path / name} is truncated: reading {nbytes} bytes at offset "
                           f"{offset} returned {got}", _REPACK)
        return buf

    def shard_indices(self, layer: int) -> list[int]:
        """The shard indices of ``layer`` (0 .. num_heads-1 for BERT)."""
        if layer not in self._by_layer:
            raise STIError(f"layer {layer} is not in the store", f"layers are 0..{self.num_layers - 1}")
        return list(self._by_layer[layer])

    def _version(self, layer: int, index: int, bits: int) -> fmt.ShardVersion:
        s = self._shards.get((layer, index))
        if s is None:
            self.shard_indices(layer)
            raise STIError(f"shard {index} of layer {layer} is not in the store",
                           f"layer {layer} has shards {self._by_layer[layer]}")
        v = s.versions.get(int(bits))
        if v is None:
            raise STIError(f"the store has no {bits}-bit version of shard (layer {layer}, index {index})",
                           f"its versions: {', '.join(map(str, sorted(s.versions)))} (32 = fp32)")
        return v

    def shard_location(self, layer: int, index: int, bits: int) -> tuple[Path, int, int]:
        """(file, offset, length) of a shard version; offset and length are multiples of 4096,
        so the caller may read it itself (O_DIRECT, io_uring, mmap)."""
        v = self._version(layer, index, bits)
        return self.path / v.file, v.offset, v.length

    def shard_nbytes(self, layer: int, index: int, bits: int) -> int:
        return self._version(layer, index, bits).length

    def read_shard_bytes(self, layer: int, index: int, bits: int, *, verify: bool = False, out=None):
        """The raw bytes of a shard version in one read (``length`` bytes, padding included);
        into ``out`` (a writable buffer of at least that size) when given, which is returned."""
        v = self._version(layer, index, bits)
        raw = self._pread(v.file, v.length, v.offset, out)
        if verify:
            self.check_shard(layer, index, bits, raw)
        return raw

    def check_shard(self, layer: int, index: int, bits: int, raw) -> None:
        """Raise STIError if ``raw`` does not match the shard version's checksum."""
        v = self._version(layer, index, bits)
        got = fmt.checksum(memoryview(raw).cast("B")[: v.length], self.manifest.checksum)
        if got != v.checksum:
            raise STIError(f"shard (layer {layer}, index {index}) {_label(bits)} version is damaged: checksum "
                           f"mismatch in {self.path / v.file} at offset {v.offset} "
                           f"(expected {v.checksum}, got {got})",
                           f"{_REPACK}; sti verify STORE lists every damaged shard")

    def decode_shard(self, layer: int, index: int, bits: int, raw, *, verify: bool = True,
                     names=None, out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A shard version's bytes -> its tensors as float32 arrays: wq, wk, wv (head_dim, H),
        wo_t (head_dim, H), w_up, w_down_t (F/nh, H), and biases bq, bk, bv, b_up (only
        ``names`` when given). fp32 tensors are views of ``raw``; k-bit ones are dequantized
        into new arrays, or into ``out[name]`` (float32 arrays of the tensor's shape) when given,
        which lets a runtime decode straight into pre-allocated scratch."""
        from sti import quant

        v = self._version(layer, index, bits)
        if verify:
            self.check_shard(layer, index, bits, raw)
        mv = memoryview(raw).cast("B")
        res = {}
        for e in self.manifest.layouts[v.layout]:
            if names is not None and e.name not in names:
                continue
            dst = None if out is None else out.get(e.name)
            if e.dtype == "quant":
                res[e.name] = self._decoder(v.layout, e)(mv[e.offset: e.offset + e.nbytes], dst)
            else:
                n = int(np.prod(e.shape))
                view = np.frombuffer(mv, dtype="<f4", count=n, offset=e.offset).reshape(e.shape)
                if dst is not None:
                    dst[...] = view
                    view = dst
                res[e.name] = view
        return res

    def _decoder(self, layout, e):
        """The layout entry's parsed :class:`sti.quant.Decoder`, made once per store."""
        from sti import quant

        key = (layout, e.name)
        d = self._decoders.get(key)
        if d is None:
            d = self._decoders[key] = quant.Decoder(e.meta)
        return d

    def read_shard(self, layer: int, index: int, bits: int, verify: bool = True) -> dict[str, np.ndarray]:
        """Read, check and decode one shard version (see :meth:`decode_shard`)."""
        return self.decode_shard(layer, index, bits, self.read_shard_bytes(layer, index, bits), verify=verify)

    # ------------------------------------------------------------------ unsharded tensors

    def _global(self, name: str) -> np.ndarray:
        e = self.manifest.globals.get(name)
        if e is None:
            raise STIError(f"the store has no tensor {name!r}", _REPACK)
        with self._lock:
            if self._globals_buf is None:
                size = self.manifest.files[fmt.GLOBALS_FILE]
                self._globals_buf = self._pread(fmt.GLOBALS_FILE, size, 0)
        mv = memoryview(self._globals_buf)[e.offset: e.offset + e.nbytes]
        if name not in self._checked:
            if fmt.checksum(mv, self.manifest.checksum) != e.checksum:
                raise STIError(f"tensor {name} in {self.path / fmt.GLOBALS_FILE} is damaged (checksum mismatch "
                               f"at offset {e.offset})", _REPACK)
            self._checked.add(name)
        return np.frombuffer(mv, dtype="<f4").reshape(e.shape)

    def globals(self) -> dict:
        """The global tensors (``embed.pos``, ``embed.type``, ``embed.ln_w``, ``embed.ln_b``) as
        float32 arrays, and ``embed.word`` as an :class:`EmbeddingTable` that reads rows on
        demand: the dict ``sti.models.bert.embed`` / ``encode`` take."""
        out = {n: self._global(n) for n in self.manifest.globals if not n.startswith("layers.")}
        out[self.manifest.embedding.name] = EmbeddingTable(self)
        return out

    def layer_common(self, layer: int) -> dict[str, np.ndarray]:
        """A layer's unsharded tensors (BERT: bo, b_down, ln1_w, ln1_b, ln2_w, ln2_b)."""
        self.shard_indices(layer)
        return {n: self._global(f"layers.{layer}.{n}") for n in self.manifest.common}

    def _load_row_crcs(self) -> np.ndarray:
        with self._lock:
            if self._row_crcs is None:
                e = self.manifest.embedding
                buf = self._pread(e.file, 4 * e.shape[0], e.row_crc_offset)
                if fmt.checksum(buf, self.manifest.checksum) != e.row_crc_checksum:
                    raise STIError(f"the row checksums in {self.path / e.file} are damaged", _REPACK)
                self._row_crcs = np.frombuffer(buf, dtype="<u4")
        return self._row_crcs

    def embedding_rows(self, ids, *, verify: bool = True) -> np.ndarray:
        """Rows ``ids`` (1-D integers) of the word-embedding table -> (n, hidden) float32, reading
        only those rows (runs of consecutive ids in one read), each checked against its crc32."""
        import zlib

        e = self.manifest.embedding
        V, H = e.shape
        ids = np.asarray(ids).reshape(-1)
        if ids.size and ids.dtype.kind not in "iu":
            raise STIError(f"token ids must be integers, got {ids.dtype}", "pass the tokenizer's ids")
        if ids.size == 0:
            return np.zeros((0, H), np.float32)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise STIError(f"token id {bad} is out of range for the vocabulary of {V}",
                           "use the tokenizer of the store (Store.tokenizer())")
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = np.empty((len(uniq), H), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(uniq)]):
            self._pread(e.file, (b - a) * e.row_bytes, e.offset + int(uniq[a]) * e.row_bytes, rows[a:b])
        if verify:
            crcs = self._load_row_crcs()
            mv = memoryview(rows).cast("B")
            for j, t in enumerate(uniq):
                if zlib.crc32(mv[j * e.row_bytes: (j + 1) * e.row_bytes]) != crcs[t]:
                    raise STIError(f"row {int(t)} of the word-embedding table in {self.path / e.file} is damaged "
                                   "(checksum mismatch)", _REPACK)
        return rows[inv.reshape(-1)]

    def tokenizer(self):
        """The store's tokenizer (``tokenizers.Tokenizer``), set up as the loaders set it up."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.path / self.manifest.tokenizer["file"]))
        if self.family == "bert":
            from sti.loaders.hf import _setup_bert_tokenizer

            _setup_bert_tokenizer(tok, self.config)
        return tok

    # ------------------------------------------------------------------ layers

    def _row_tail(self, layer: int, name: str) -> tuple[int, ...]:
        """Shape of a shard tensor without its first axis (for zero-width layers)."""
        s = self._shards[(layer, self._by_layer[layer][0])]
        lay = self.manifest.layouts[next(iter(s.versions.values())).layout]
        return tuple(next(e.shape for e in lay if e.name == name)[1:])

    def combine_shards(self, layer: int, decoded: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Decoded shards {index: decode_shard(...)} of one layer -> the canonical layer dict
        (BERT: wq (n*hd, H) ... wo (H, n*hd), w_up (n*F/nh, H), w_down (H, n*F/nh)) in shard
        index order. An empty mapping gives a zero-width layer (only the unsharded parts act)."""
        self.shard_indices(layer)
        idx = sorted(decoded)
        for i in idx:
            if (layer, i) not in self._shards:
                raise STIError(f"shard {i} of layer {layer} is not in the store",
                               f"layer {layer} has shards {self._by_layer[layer]}")
        out = dict(self.layer_common(layer))
        for st in self.manifest.shard_tensors:
            parts = [decoded[i][st.name] for i in idx]
            if not parts:
                cat = np.zeros((0,) + self._row_tail(layer, st.name), np.float32)
            elif len(parts) == 1:
                cat = parts[0]
            else:
                cat = np.concatenate(parts, axis=0)
            out[st.target] = cat if st.axis == 0 else cat.T
        return out

    def assemble_layer(self, layer: int, shards: Mapping[int, int], verify: bool = True) -> dict[str, np.ndarray]:
        """Read shards {index: bits} of ``layer`` and return the canonical layer dict, ready for
        ``sti.models.bert.layer`` (see :meth:`combine_shards`)."""
        self.shard_indices(layer)
        return self.combine_shards(layer, {i: self.read_shard(layer, i, b, verify) for i, b in shards.items()})

    def full_layers(self, bits: int = fmt.FP32):
        """Every layer at full width and one bitwidth, as a generator of layer dicts."""
        for layer in range(self.num_layers):
            yield self.assemble_layer(layer, {i: bits for i in self.shard_indices(layer)})

    # ------------------------------------------------------------------ checks and facts

    def verify(self) -> list[str]:
        """Check every checksum in the store; return the problems found (empty: the store is intact)."""
        import zlib

        m, problems = self.manifest, []
        for name, size in {**m.files, m.tokenizer["file"]: m.tokenizer["nbytes"]}.items():
            f = self.path / name
            got = f.stat().st_size if f.is_file() else None
            if got != size:
                problems.append(f"{f}: {'missing' if got is None else f'{got} bytes'}, expected {size} bytes")
        if problems:
            return problems
        tok = (self.path / m.tokenizer["file"]).read_bytes()
        if fmt.checksum(tok, m.checksum) != m.tokenizer["checksum"]:
            problems.append(f"{self.path / m.tokenizer['file']}: checksum mismatch")
        for s in m.shards:
            for bits, v in s.versions.items():
                try:
                    self.read_shard_bytes(s.layer, s.index, bits, verify=True)
                except STIError as exc:
                    problems.append(exc.problem)
        gbuf = self._pread(fmt.GLOBALS_FILE, m.files[fmt.GLOBALS_FILE], 0)
        for name, e in m.globals.items():
            if fmt.checksum(memoryview(gbuf)[e.offset: e.offset + e.nbytes], m.checksum) != e.checksum:
                problems.append(f"tensor {name} in {self.path / fmt.GLOBALS_FILE} (offset {e.offset}): checksum mismatch")
        e = m.embedding
        try:
            crcs = self._load_row_crcs()
        except STIError as exc:
            problems.append(exc.problem)
        else:
            table = self._pread(e.file, e.nbytes, e.offset)
            n, bad = e.row_bytes, []
            mv = memoryview(table)
            for r in range(e.shape[0]):
                if zlib.crc32(mv[r * n: (r + 1) * n]) != crcs[r]:
                    bad.append(r)
            if bad:
                problems.append(f"{len(bad)} rows of the word-embedding table in {self.path / e.file} are damaged "
                                f"(checksum mismatch; first rows: {bad[:5]})")
        return problems

    def evict(self) -> None:
        """Drop the store's data files from the page cache (posix_fadvise DONTNEED), for cold-IO
        measurements. Best effort: a no-op where the OS lacks it."""
        if not hasattr(os, "posix_fadvise"):
            return
        for fd in self._fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def summary(self) -> dict:
        """Facts about the store for ``sti info STORE`` (JSON-able)."""
        m = self.manifest
        per_version = {}
        shard_bytes = {}
        for b in self.bits:
            lengths = [s.versions[b].length for s in m.shards if b in s.versions]
            per_version[_label(b)] = sum(lengths)
            shard_bytes[_label(b)] = max(lengths) if lengths else 0
        return {
            "path": str(self.path),
            "format_version": m.format_version,
            "sti_version": m.sti_version,
            "family": m.family,
            "model": m.source.get("model"),
            "source": m.source.get("path"),
            "created": m.created,
            "layers": self.num_layers,
            "shards_per_layer": len(self._by_layer[0]) if self._by_layer else 0,
            "shards": len(m.shards),
            "versions": [_label(b) for b in self.bits],
            "bytes_per_version": per_version,
            "bytes_per_shard": shard_bytes,
            "globals_bytes": m.files[fmt.GLOBALS_FILE],
            "embedding_bytes": m.files[fmt.EMBED_FILE],
            "manifest_bytes": (self.path / fmt.MANIFEST).stat().st_size,
            "total_bytes": sum(m.files.values()) + m.tokenizer["nbytes"] + (self.path / fmt.MANIFEST).stat().st_size,
            "group_size": m.group_size,
            "checksum": m.checksum,
            "config": dict(m.config),
        }
