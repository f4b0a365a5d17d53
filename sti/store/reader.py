"""``Store``: read a shard store (layout in :mod:`sti.store.format`).

Reads are ``os.pread`` on file descriptors opened once, so one ``Store`` can serve an IO
thread and a compute thread at the same time. The split an elastic runtime needs is:
``read_shard_bytes`` (IO: one contiguous, 4096-aligned read), ``check_shard`` (checksum) and
``decode_shard`` (dequantize to float32), then ``combine_shards`` (the canonical layer dict that
``sti.models.bert.layer`` / ``sti.models.llama.layer`` run at whatever width they are given).
``read_shard`` and ``assemble_layer`` do it all in one call. Kernels that compute on the stored
form itself (fused low-bit matrix-vector products) take ``shard_tensors_raw`` instead of
``decode_shard``: zero-copy :class:`RawTensor` views of a shard version's bytes.

A decoder store also has LM-head shards, addressed as layer ``HEAD``: the same calls read,
check, decode and combine them (``combine_shards(HEAD, ...)`` gives ``{"lm_head": (rows, H)}``).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sti.errors import STIError
from sti.store import format as fmt

_REPACK = "re-pack the store: sti pack MODEL -o STORE --overwrite"


def is_store(path: str | Path) -> bool:
    """Whether ``path`` looks like a shard store (a directory with a manifest); cheap, no validation."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / fmt.MANIFEST).is_file()


def _config(family: str, d: dict):
    if family == "bert":
        from sti.models.bert import BertConfig

        return BertConfig(**d)
    if family == "llama":
        from sti.models.llama import LlamaConfig

        return LlamaConfig(**d)
    raise STIError(f"the store holds an unknown model family {family!r}", "re-pack it with this STI")


def _where(layer: int, index: int) -> str:
    return f"LM-head shard {index}" if layer == fmt.HEAD else f"shard (layer {layer}, index {index})"


@dataclass(frozen=True)
class RawTensor:
    """A shard tensor as stored, for kernels that compute on it without decoding to float32.
    ``buf`` is a zero-copy view of the shard version's bytes (keep those alive), by ``kind``:

    - ``"f32"``: a float32 array of ``shape``;
    - ``"sti-q1"``: the uint8 bytes of :mod:`sti.quant`'s layout; ``meta`` is its
      ``QuantizedTensor.meta()``, so ``sti.quant.from_buffer(buf, meta)`` gives the tensor;
    - ``"ggml-<type>"`` (``"ggml-q4_1"``, ``"ggml-q8_0"``, ...): the rows' GGML blocks, uint8
      (rows, cols / block * block_bytes); ``meta`` is {"ggml_type", "block", "block_bytes"}.

    ``shape`` is (rows, cols) as stored: (out, in) for every LLaMA matrix, so y = W @ x;
    the manifest's ``ShardTensor`` says which slice of which canonical tensor it is."""

    kind: str
    shape: tuple[int, ...]
    meta: dict | None
    buf: np.ndarray


def _ggml_type(meta: dict):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[meta["ggml_type"]]


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


def _pread_many_py(fds, offsets, bufs) -> int:
    """``sti._kernels.pread_many`` without the C kernels: the same reads, one os.preadv each, and
    the same announcement of the items from the first one not in the page cache on."""
    nowait = getattr(os, "RWF_NOWAIT", None) if len(bufs) > 1 and hasattr(os, "posix_fadvise") else None
    for i, (fd, at, buf) in enumerate(zip(fds, offsets, bufs)):
        mv, done = memoryview(buf).cast("B"), 0
        while done < len(mv):
            if nowait is not None:
                try:
                    got = os.preadv(fd, [mv[done:]], at + done, nowait)
                except BlockingIOError:
                    got = 0
                except OSError:  # no RWF_NOWAIT here: plain reads
                    nowait = None
                    continue
                done += got
                if done < len(mv):  # not all cached (or the end of the file): announce the rest
                    nowait = None
                    for f, o, b in zip(fds[i:], offsets[i:], bufs[i:]):
                        if nb := memoryview(b).nbytes:
                            os.posix_fadvise(f, o, nb, os.POSIX_FADV_WILLNEED)
                continue
            got = os.preadv(fd, [mv[done:]], at + done)
            if got == 0:
                return i
            done += got
    return -1


try:
    from sti._kernels import pread_many as _pread_many
except ImportError:  # pragma: no cover - the C kernels are built by the package's own build step
    _pread_many = _pread_many_py


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
        self.num_layers = sum(1 for layer in self._by_layer if layer != fmt.HEAD)
        self._fds: dict[str, int] = {}
        for name in manifest.files:
            self._fds[name] = os.open(path / name, os.O_RDONLY)
        self.sequential = False
        self.read_pattern(sequential=False)
        self._lock = threading.Lock()
        self._globals_buf: bytes | None = None
        self._checked: set[str] = set()
        self._row_crcs: np.ndarray | None = None
        self._decoders: dict = {}
        self._tokenizer = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open and validate a store: manifest present and of this format version, data files
        present with the sizes the manifest records."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise STIError(f"no such store: {path}", "create it with: sti pack MODEL -o STORE")
        mpath = path / fmt.MANIFEST
        if not mpath.is_file():
            if re.fullmatch(r"\..+\.(tmp|old)-\d+", path.name):
                raise STIError(f"{path} is not an STI store (no manifest.json): it is left over from an "
                               "interrupted sti pack", "delete it and run sti pack again")
            raise STIError(f"{path} is not an STI store (no manifest.json)", "run sti pack MODEL -o STORE to create one")
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
                           f"re-pack the store with this STI: sti pack MODEL -o {path} --overwrite")
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

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            raise STIError(f"store {self.path} is closed", "open it again with Store.open")
        return fd

    def _pread(self, name: str, nbytes: int, offset: int, out=None):
        fd = self._fd(name)
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

    @property
    def special(self) -> dict:
        """Generation settings of a decoder: bos_id, eos_id, stop_ids, add_bos."""
        return dict(self.manifest.special)

    @property
    def chat_template(self) -> str | None:
        return self.manifest.chat_template

    def shard_indices(self, layer: int) -> list[int]:
        """The shard indices of ``layer`` (0 .. num_heads-1 for BERT, 0 .. num_kv_heads-1 for
        LLaMA) or of the LM head (``layer=HEAD``)."""
        if layer not in self._by_layer:
            if layer == fmt.HEAD:
                raise STIError("the store has no LM-head shards", "a decoder store has them: sti pack a LLaMA model")
            raise STIError(f"layer {layer} is not in the store", f"layers are 0..{self.num_layers - 1}")
        return list(self._by_layer[layer])

    def shard_ranges(self, layer: int, index: int) -> dict[str, list[int]]:
        """Which slices shard ``index`` of ``layer`` holds: {range: [start, stop)} (BERT: attn,
        ffn; LLaMA: attn, kv, ffn; HEAD: vocab, the rows of the logits it computes)."""
        self.shard_indices(layer)
        s = self._shards.get((layer, index))
        if s is None:
            raise STIError(f"{_where(layer, index)} is not in the store", f"it has shards {self._by_layer[layer]}")
        return {k: list(v) for k, v in s.ranges.items()}

    def tensors(self, layer: int) -> list[fmt.ShardTensor]:
        """What each tensor of ``layer``'s shards is (the HEAD shards have their own)."""
        return self.manifest.head_tensors if layer == fmt.HEAD else self.manifest.shard_tensors

    def _version(self, layer: int, index: int, bits: int) -> fmt.ShardVersion:
        s = self._shards.get((layer, index))
        if s is None:
            self.shard_indices(layer)
            raise STIError(f"{_where(layer, index)} is not in the store",
                           f"it has shards {self._by_layer[layer]}")
        v = s.versions.get(int(bits))
        if v is None:
            raise STIError(f"the store has no {fmt.label(int(bits))} version of {_where(layer, index)}",
                           f"its versions: {', '.join(f'{b} ({fmt.label(b)})' for b in sorted(s.versions))}")
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

    def read_many(self, versions, bufs, verify=False) -> None:
        """Shard versions [(layer, index, bits)], each into its buffer of ``bufs`` (writable, at
        least the version's length), by one call: the C kernels read them one after another with
        the GIL released, so a thread reading a layer's shards hands the GIL to the others once,
        not once per shard. ``verify``: whether to check each one's checksum (one bool, or one
        per version)."""
        vs = [self._version(*r) for r in versions]
        fds = [self._fd(v.file) for v in vs]
        short = _pread_many(fds, [v.offset for v in vs], [memoryview(b).cast("B")[:v.length] for b, v in zip(bufs, vs)])
        if short >= 0:
            v = vs[short]
            raise STIError(f"store file {self.path / v.file} is truncated: the {v.length} bytes of "
                           f"{_where(*versions[short][:2])} at offset {v.offset} run past its end", _REPACK)
        checks = [verify] * len(vs) if isinstance(verify, bool) else verify
        for r, buf, check in zip(versions, bufs, checks):
            if check:
                self.check_shard(*r, buf)

    def check_shard(self, layer: int, index: int, bits: int, raw) -> None:
        """Raise STIError if ``raw`` does not match the shard version's checksum."""
        v = self._version(layer, index, bits)
        got = fmt.checksum(memoryview(raw).cast("B")[: v.length], self.manifest.checksum)
        if got != v.checksum:
            raise STIError(f"{_where(layer, index)} {fmt.label(bits)} version is damaged: checksum "
                           f"mismatch in {self.path / v.file} at offset {v.offset} "
                           f"(expected {v.checksum}, got {got})",
                           f"{_REPACK}; sti verify STORE lists every damaged shard")

    def decode_shard(self, layer: int, index: int, bits: int, raw, *, verify: bool = True,
                     names=None, out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A shard version's bytes -> its tensors as float32 arrays (only ``names`` when given),
        named and shaped as ``tensors(layer)`` says: BERT wq, wk, wv (head_dim, H), wo_t
        (head_dim, H), w_up, w_down_t (F/nh, H), biases bq, bk, bv, b_up; LLaMA wq (g*hd, H), wk,
        wv (hd, H), wo (H, g*hd), w_gate, w_up (F/n_kv, H), w_down (H, F/n_kv); HEAD lm_head
        (rows, H). fp32 tensors are views of ``raw``; k-bit and source ones are decoded into new
        arrays, or into ``out[name]`` (float32 arrays of the tensor's shape) when given, which
        lets a runtime decode straight into pre-allocated scratch. The source version decodes to
        exactly the float32 weights its source loads as."""
        from gguf.quants import dequantize

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
                continue
            t = self._raw_tensor(mv, e)
            a = t.buf if e.dtype == "float32" else dequantize(t.buf, _ggml_type(e.meta))
            if dst is not None:
                dst[...] = a
                a = dst
            res[e.name] = a
        return res

    def shard_tensors_raw(self, layer: int, index: int, bits: int, raw, *, verify: bool = True,
                          names=None) -> dict[str, RawTensor]:
        """A shard version's tensors as stored, without decoding: {name: :class:`RawTensor`}
        (only ``names`` when given), zero-copy views of ``raw`` (from :meth:`read_shard_bytes`)."""
        v = self._version(layer, index, bits)
        if verify:
            self.check_shard(layer, index, bits, raw)
        mv = memoryview(raw).cast("B")
        return {e.name: self._raw_tensor(mv, e) for e in self.manifest.layouts[v.layout]
                if names is None or e.name in names}

    @staticmethod
    def _raw_tensor(mv: memoryview, e: fmt.TensorEntry) -> RawTensor:
        shape = tuple(e.shape)
        if e.dtype == "float32":
            buf = np.frombuffer(mv, dtype="<f4", count=int(np.prod(shape)), offset=e.offset).reshape(shape)
            return RawTensor("f32", shape, None, buf)
        buf = np.frombuffer(mv, dtype=np.uint8, count=e.nbytes, offset=e.offset)
        if e.dtype == "quant":
            return RawTensor(e.meta["layout"], shape, e.meta, buf)
        return RawTensor(e.dtype, shape, e.meta, buf.reshape(shape[0], -1))

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
        """The global tensors as float32 arrays (BERT: ``embed.pos``, ``embed.type``,
        ``embed.ln_w``, ``embed.ln_b``; LLaMA: ``norm``) and the word embedding (``embed.word``,
        ``embed``) as an :class:`EmbeddingTable` that reads rows on demand: the dict
        ``sti.models.bert.encode`` takes; for ``sti.models.llama.forward`` it serves the
        embedding lookup and the final norm (the LM head comes from the HEAD shards)."""
        out = {n: self._global(n) for n in self.manifest.globals if not n.startswith("layers.")}
        out[self.manifest.embedding.name] = EmbeddingTable(self)
        return out

    def layer_common(self, layer: int) -> dict[str, np.ndarray]:
        """A layer's unsharded tensors (BERT: bo, b_down, ln1_w, ln1_b, ln2_w, ln2_b; LLaMA:
        attn_norm, ffn_norm; the HEAD pseudo-layer has none)."""
        if layer == fmt.HEAD:
            return {}
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
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(uniq)]
        fd = self._fd(e.file)
        # every run of consecutive ids in one call (a request's rows are ~30 reads of 1.5 KB)
        short = _pread_many([fd] * len(starts), [e.offset + int(uniq[a]) * e.row_bytes for a in starts],
                            [rows[a:b] for a, b in zip(starts, ends)])
        if short >= 0:
            raise STIError(f"store file {self.path / e.file} is truncated: row {int(uniq[starts[short]])} of the "
                           "word-embedding table runs past its end", _REPACK)
        if verify:
            crcs = self._load_row_crcs()
            mv = memoryview(rows).cast("B")
            for j, t in enumerate(uniq):
                if zlib.crc32(mv[j * e.row_bytes: (j + 1) * e.row_bytes]) != crcs[t]:
                    raise STIError(f"row {int(t)} of the word-embedding table in {self.path / e.file} is damaged "
                                   "(checksum mismatch)", _REPACK)
        return rows[inv.reshape(-1)]

    def tokenizer(self):
        """The store's tokenizer (``tokenizers.Tokenizer``), set up as the loaders set it up;
        loaded once per open store (~0.16 s for SmolLM2's)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.path / self.manifest.tokenizer["file"]))
            if self.family == "bert":
                from sti.loaders.hf import _setup_bert_tokenizer

                _setup_bert_tokenizer(tok, self.config)
            self._tokenizer = tok
        return self._tokenizer

    # ------------------------------------------------------------------ layers

    def _empty(self, layer: int, st: fmt.ShardTensor) -> np.ndarray:
        """A zero-width ``st`` of ``layer`` (no shard of it taken), as stored."""
        s = self._shards[(layer, self._by_layer[layer][0])]
        lay = self.manifest.layouts[next(iter(s.versions.values())).layout]
        shape = list(next(e.shape for e in lay if e.name == st.name))
        shape[st.stored_axis] = 0
        return np.zeros(shape, np.float32)

    def combine_shards(self, layer: int, decoded: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Decoded shards {index: decode_shard(...)} of one layer -> the canonical layer dict in
        shard index order (BERT: wq (n*hd, H) ... wo (H, n*hd), w_up (n*F/nh, H), w_down (H, n*F/nh);
        LLaMA: wq (n*g*hd, H), wk, wv (n*hd, H), wo (H, n*g*hd), w_gate, w_up (n*F/n_kv, H),
        w_down (H, n*F/n_kv); HEAD: lm_head (rows, H)). An empty mapping gives a zero-width layer
        (only the unsharded parts act)."""
        self.shard_indices(layer)
        idx = sorted(decoded)
        for i in idx:
            if (layer, i) not in self._shards:
                raise STIError(f"{_where(layer, i)} is not in the store", f"it has shards {self._by_layer[layer]}")
        out = dict(self.layer_common(layer))
        for st in self.tensors(layer):
            parts = [decoded[i][st.name] for i in idx]
            if not parts:
                cat = self._empty(layer, st)
            elif len(parts) == 1:
                cat = parts[0]
            else:
                cat = np.concatenate(parts, axis=st.stored_axis)
            out[st.target] = cat.T if st.transposed else cat
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

    def read_pattern(self, sequential: bool) -> None:
        """Tell the OS how the data files will be read (``posix_fadvise``). Random (the default):
        an encoder plan hops between versions shard by shard, so read-ahead would only waste IO.
        Sequential: a decoder pass reads every streamed shard in file order, token after token;
        the OS then reads ahead, and fills its page cache with large folios instead of single
        pages, which makes faulting a shard's pages into a mapping and dropping them again several
        times cheaper (SmolLM2's 96 MB per token, measured here: ~3 ms against ~11 ms of page-table
        work; the pages a random-pattern read brought in stay single pages until evicted)."""
        self.sequential = bool(sequential)
        if hasattr(os, "posix_fadvise"):
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL if sequential else os.POSIX_FADV_RANDOM)

    def evict(self) -> None:
        """Drop the store's data files from the page cache (posix_fadvise DONTNEED), for cold-IO
        measurements. Best effort: a no-op where the OS lacks it."""
        if not hasattr(os, "posix_fadvise"):
            return
        for fd in self._fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def summary(self) -> dict:
        """Facts about the store for ``sti info STORE`` (JSON-able). Bytes per version count every
        shard, the LM head's included; bytes per shard are the largest layer (and head) shard."""
        m = self.manifest
        per_version, shard_bytes, head_bytes = {}, {}, {}
        for b in self.bits:
            name = fmt.label(b)
            of_layers = [s.versions[b].length for s in m.shards if b in s.versions and s.layer != fmt.HEAD]
            of_head = [s.versions[b].length for s in m.shards if b in s.versions and s.layer == fmt.HEAD]
            per_version[name] = sum(of_layers) + sum(of_head)
            shard_bytes[name] = max(of_layers, default=0)
            if of_head:
                head_bytes[name] = max(of_head)
        source_types = sorted({e.meta["ggml_type"] if e.meta else "F32" for s in m.shards
                               if fmt.SOURCE in s.versions for e in m.layouts[s.versions[fmt.SOURCE].layout]})
        head = self._by_layer.get(fmt.HEAD, [])
        manifest_bytes = (self.path / fmt.MANIFEST).stat().st_size
        return {
            "path": str(self.path),
            "format_version": m.format_version,
            "sti_version": m.sti_version,
            "family": m.family,
            "model": m.source.get("model"),
            "source": m.source.get("path"),
            "created": m.created,
            "layers": self.num_layers,
            "shards_per_layer": len(self._by_layer[0]) if 0 in self._by_layer else 0,
            "shards": len(m.shards) - len(head),
            "head_shards": len(head),
            "versions": [fmt.label(b) for b in self.bits],
            "source_types": source_types,
            "bytes_per_version": per_version,
            "bytes_per_shard": shard_bytes,
            "bytes_per_head_shard": head_bytes,
            "globals_bytes": m.files[fmt.GLOBALS_FILE],
            "embedding_bytes": m.files[fmt.EMBED_FILE],
            "manifest_bytes": manifest_bytes,
            "total_bytes": sum(m.files.values()) + m.tokenizer["nbytes"] + manifest_bytes,
            "group_size": m.group_size,
            "checksum": m.checksum,
            "notes": list(m.notes),
            "config": dict(m.config),
        }
