"""GGUF files (llama.cpp's format): a fast header parser of our own, dequantization to float32,
the canonical LLaMA weights (wq/wk rows un-permuted back to the Hugging Face RoPE layout), and a
``tokenizers.Tokenizer`` rebuilt from the vocabulary the file carries.

The gguf package is used only for its constants and its dequantization kernels: its own reader
makes a NumPy view per array element, which takes seconds on a 49k-token vocabulary, where this
parser takes a few tens of milliseconds.
"""

from __future__ import annotations

import mmap
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from sti.errors import STIError
from sti.loaders import Checkpoint

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_T = GGMLQuantizationType
SUPPORTED_TYPES = (_T.F32, _T.F16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q4_K, _T.Q6_K)

# Scalar value types: struct format (little-endian) and the matching NumPy dtype for arrays.
_V = GGUFValueType
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    int(_V.UINT8): (struct.Struct("<B"), np.dtype("<u1")),
    int(_V.INT8): (struct.Struct("<b"), np.dtype("<i1")),
    int(_V.UINT16): (struct.Struct("<H"), np.dtype("<u2")),
    int(_V.INT16): (struct.Struct("<h"), np.dtype("<i2")),
    int(_V.UINT32): (struct.Struct("<I"), np.dtype("<u4")),
    int(_V.INT32): (struct.Struct("<i"), np.dtype("<i4")),
    int(_V.FLOAT32): (struct.Struct("<f"), np.dtype("<f4")),
    int(_V.BOOL): (struct.Struct("<?"), np.dtype("?")),
    int(_V.UINT64): (struct.Struct("<Q"), np.dtype("<u8")),
    int(_V.INT64): (struct.Struct("<q"), np.dtype("<i8")),
    int(_V.FLOAT64): (struct.Struct("<d"), np.dtype("<f8")),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Tokenizer data tables.
# tokenizer.ggml.pre -> how text is split before byte-level BPE, as llama.cpp does for that name:
# "digits" isolates every digit first, "byte_level" is the GPT-2 split and byte alphabet,
# ("split", regex) splits with a regex, then "byte_level_only" maps to the byte alphabet.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = {"steps": ("digits", "byte_level")}
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "llama-bpe": {"steps": (("split", _LLAMA3_SPLIT), "byte_level_only"), "ignore_merges": True},
    "llama3": {"steps": (("split", _LLAMA3_SPLIT), "byte_level_only"), "ignore_merges": True},
}
DEFAULT_PRE_TOKENIZER: dict[str, Any] = {"steps": ("byte_level",)}  # GPT-2
TOKENIZER_MODELS = ("gpt2",)
# Control tokens that end a turn; their ids join eos/eot in ``special["stop_ids"]``.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|end|>")
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"unknown type {t}"


def _supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_TYPES)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order: the reverse of GGUF's ne[] (rows, cols for a matrix)
    ggml_type: int  # a GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return _type_name(self.ggml_type)

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.shape[-1] // block * size


@dataclass
class GGUFFile:
    path: Path
    version: int
    meta: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int  # absolute offset of the tensor data section
    _mm: Any = field(default=None, repr=False)

    def _buffer(self) -> np.ndarray:
        if self._mm is None:
            self._mm = _map(self.path)
        return np.frombuffer(self._mm, dtype=np.uint8)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise STIError(f"{self.path} has no tensor {name!r}",
                           "the file is not a complete model of its architecture") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file, shape (*rows, row_bytes)."""
        info = self._info(name)
        flat = self._buffer()[info.offset:info.offset + info.nbytes]
        return flat.reshape(*info.shape[:-1], info.row_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new C-contiguous float32 array in NumPy order (rows, cols)."""
        info = self._info(name)
        check_supported(info, self.path)
        raw = self.raw(name)
        t = info.ggml_type
        if t == GGMLQuantizationType.F32:
            out = raw.view("<f4").astype(np.float32, copy=True)
        elif t == GGMLQuantizationType.F16:
            out = raw.view("<f2").astype(np.float32)
        else:
            out = _dequantize_blocks(raw, GGMLQuantizationType(t))
        return np.ascontiguousarray(out.reshape(info.shape), dtype=np.float32)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # arrays still view the mapping; it closes when they go
                pass
            self._mm = None


_CHUNK_BLOCKS = 2048  # blocks per call: big enough to amortize NumPy's per-call cost, small enough for cache


def _dequantize_blocks(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf.quants' kernel for ``qtype``, run over large runs of blocks into one preallocated array.

    Bit-identical to ``gguf.quants.dequantize`` (every block is dequantized on its own), but about
    1.5x faster: that function slices the tensor into groups of 16 rows and concatenates them."""
    from gguf import quants

    cls = getattr(quants, qtype.name, None)
    kernel = getattr(cls, "dequantize_blocks", None)
    if kernel is None:
        return quants.dequantize(raw, qtype)
    if hasattr(cls, "init_grid"):  # lookup tables of the IQ types; a no-op for the others
        cls.init_grid()
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, size)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[s:s + _CHUNK_BLOCKS] = kernel(blocks[s:s + _CHUNK_BLOCKS])
    return out


def check_supported(info: TensorInfo, path: Path | None = None) -> None:
    if info.ggml_type not in SUPPORTED_TYPES:
        where = f" in {path}" if path else ""
        raise STIError(f"tensor {info.name!r}{where} has type {info.type_name}, which STI cannot dequantize",
                       f"use a GGUF file quantized to one of: {_supported_names()}")


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _truncated(path: Path, what: str) -> STIError:
    return STIError(f"{path} is truncated: the file ends inside its {what}",
                    "the download was incomplete or the file is damaged; re-download it")


class _Parser:
    """Reads GGUF values from a mapped file, tracking the position."""

    def __init__(self, mm: mmap.mmap, path: Path):
        self.mm, self.path, self.pos, self.size = mm, path, 0, len(mm)

    def scalar(self, st: struct.Struct) -> Any:
        (v,) = st.unpack_from(self.mm, self.pos)
        self.pos += st.size
        return v

    def string(self) -> str:
        n = self.scalar(_U64)
        end = self.pos + n
        if end > self.size:
            raise struct.error("string past the end")
        s = self.mm[self.pos:end].decode("utf-8", "replace")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _V.STRING:
            return self.string()
        if vtype == _V.ARRAY:
            etype = self.scalar(_U32)
            count = self.scalar(_U64)
            return self.array(etype, count)
        sc = _SCALARS.get(vtype)
        if sc is None:
            raise STIError(f"{self.path} has a metadata value of unknown type {vtype} at byte {self.pos}",
                           "the file is damaged or from a newer GGUF version; re-download or re-convert it")
        return self.scalar(sc[0])

    def array(self, etype: int, count: int) -> list:
        left = self.size - self.pos
        if etype in _SCALARS:
            dt = _SCALARS[etype][1]
            if count * dt.itemsize > left:
                raise struct.error("array past the end")
            out = np.frombuffer(self.mm, dtype=dt, count=count, offset=self.pos).tolist()
            self.pos += count * dt.itemsize
            return out
        if count * 8 > left:  # every string or nested array takes at least 8 bytes
            raise struct.error("array past the end")
        if etype == _V.STRING:
            return self._strings(count)
        return [self.value(etype) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        # The hot loop of the parser (vocabularies, merges): locals only.
        mm, pos, size = self.mm, self.pos, self.size
        unpack = _U64.unpack_from
        out = [""] * count
        for i in range(count):
            n = unpack(mm, pos)[0]
            pos += 8
            out[i] = mm[pos:pos + n].decode("utf-8", "replace")
            pos += n
        if pos > size:
            raise struct.error("string past the end")
        self.pos = pos
        return out


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; tensor data stays mapped, unread."""
    path = Path(path)
    try:
        mm = _map(path)
    except ValueError:  # mmap of an empty file
        raise STIError(f"{path} is empty, not a GGUF file", "re-download the file") from None
    except OSError as exc:
        raise STIError(f"cannot open {path}: {exc.strerror or exc}", "check the path and its permissions") from None
    head = mm[:8]
    if head[:4] != GGUF_MAGIC:
        raise STIError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')",
                       "pass a .gguf model file, a Hugging Face model directory, or a built-in model name")
    if len(head) < 8:
        raise _truncated(path, "header")
    version = _U32.unpack_from(head, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack(">I", head[4:8])[0]
        hint = (" (a big-endian file)" if swapped in SUPPORTED_VERSIONS else "")
        raise STIError(f"{path} is GGUF version {version}{hint}; STI reads little-endian GGUF versions "
                       f"{' and '.join(map(str, SUPPORTED_VERSIONS))}",
                       "re-convert the model with a recent llama.cpp (convert_hf_to_gguf.py)")
    p = _Parser(mm, path)
    p.pos = 8
    section = "header"
    try:
        n_tensors = p.scalar(_U64)
        n_kv = p.scalar(_U64)
        section = "metadata"
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = p.string()
            meta[key] = p.value(p.scalar(_U32))
        section = "tensor table"
        if n_tensors * 24 > p.size - p.pos:
            raise struct.error("tensor table past the end")
        table = []
        for _ in range(n_tensors):
            name = p.string()
            n_dims = p.scalar(_U32)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, p.pos)
            p.pos += 8 * n_dims
            table.append((name, dims, p.scalar(_U32), p.scalar(_U64)))
    except struct.error:
        raise _truncated(path, section) from None
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise STIError(f"{path} has an invalid general.alignment {alignment!r}", "re-convert or re-download the file")
    data_offset = -(-p.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    end = data_offset
    for name, dims, ttype, rel in table:
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise STIError(f"tensor {name!r} in {path} has unknown ggml type {ttype}",
                           f"use a GGUF file quantized to one of: {_supported_names()}") from None
        block, size = GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if shape and shape[-1] % block:
            raise STIError(f"tensor {name!r} in {path} has {shape[-1]} columns, not a multiple of the "
                           f"{qtype.name} block size {block}", "the file is damaged; re-download it")
        info = TensorInfo(name, shape if shape else (1,), int(ttype), data_offset + rel, n // block * size)
        tensors[name] = info
        end = max(end, info.offset + info.nbytes)
    if end > p.size:
        raise STIError(f"{path} is truncated: its tensors need {end} bytes but the file has {p.size}",
                       "the download was incomplete or the file is damaged; re-download it")
    return GGUFFile(path=path, version=version, meta=meta, tensors=tensors, alignment=alignment,
                    data_offset=data_offset, _mm=mm)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of wq/wk: from RoPE on adjacent pairs of each head's rows
    back to RoPE on the two halves (the Hugging Face layout). The converter did
    ``w.reshape(n_head, 2, r // 2, cols).swapaxes(1, 2).reshape(rows, cols)`` with r rows per head."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise STIError(f"cannot un-permute a {w.shape} RoPE projection into {n_head} heads",
                       "the file's head counts do not match its wq/wk shapes; re-convert the model")
    r = rows // n_head
    return np.ascontiguousarray(w.reshape(n_head, r // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _pre_tokenizer(steps: tuple):
    from tokenizers import Regex, pre_tokenizers

    def build(step):
        if step == "digits":
            return pre_tokenizers.Digits(individual_digits=True)
        if step == "byte_level":
            return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if step == "byte_level_only":
            return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        kind, pattern = step
        assert kind == "split", step
        return pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    parts = [build(s) for s in steps]
    return parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(parts)


def gguf_tokenizer(meta: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` from the vocabulary in a GGUF file's metadata (byte-level BPE).
    Control tokens are special (matched whole, dropped by ``skip_special_tokens``); user-defined
    tokens are matched whole and kept when decoding. No BOS is added: the caller does that."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = meta.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        supported = ", ".join(map(repr, TOKENIZER_MODELS))
        raise STIError(f"the GGUF tokenizer model is {model!r}; STI builds only {supported} (byte-level BPE) "
                       "tokenizers from GGUF",
                       "use a Hugging Face model directory with tokenizer.json instead")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise STIError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)",
                       "use a GGUF file converted with its tokenizer, or a Hugging Face model directory")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre") or "", DEFAULT_PRE_TOKENIZER)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=pre.get("ignore_merges", False)))
    tok.pre_tokenizer = _pre_tokenizer(pre["steps"])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok


def gguf_special(meta: dict[str, Any]) -> dict[str, Any]:
    """bos_id, eos_id, stop_ids (eos, eot and the end-of-turn control tokens) and add_bos."""
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    stop: list[int] = [int(i) for i in (eos, eot) if i is not None]
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_TYPE_CONTROL and t in END_OF_TURN_TOKENS:
            stop.append(i)
    return {"bos_id": None if bos is None else int(bos), "eos_id": None if eos is None else int(eos),
            "stop_ids": list(dict.fromkeys(stop)), "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", False))}


_PACKED_KINDS = {"Q4_1": "ggml-q4_1", "Q8_0": "ggml-q8_0"}  # GGML type -> sti.lowbit kind


def load_gguf(path: str | Path, progress: bool = True, packed: bool = False) -> Checkpoint:
    """A GGUF LLaMA-family model as a ``Checkpoint`` of canonical float32 weights; with ``packed``,
    matrices in a block format the fused kernels read (Q4_1, Q8_0; :data:`sti.lowbit.KINDS`) stay
    packed as :class:`sti.lowbit.LowBitTensor` over the file's mapped bytes (wq/wk rows
    un-permuted into a copy), and only the rest is dequantized."""
    from sti.models import llama as fam

    f = read_gguf(path)
    meta = f.meta
    arch = meta.get("general.architecture")
    if arch not in fam.GGUF_ARCHITECTURES:
        raise STIError(f"{f.path} holds a {arch!r} model; "
                       f"STI runs GGUF architectures: {', '.join(fam.GGUF_ARCHITECTURES)}",
                       "use a GGUF file of a supported architecture, or a Hugging Face model directory")
    try:
        cfg = fam.LlamaConfig.from_gguf(meta, tie_embeddings="output.weight" not in f.tensors)
    except KeyError as exc:
        raise STIError(f"{f.path} lacks the metadata key {exc.args[0]!r}",
                       "re-convert the model with a recent llama.cpp") from None
    tokenizer = gguf_tokenizer(meta)

    plan: list[tuple[str, str, int]] = []  # canonical name, gguf name, heads to un-permute (0: none)
    for canon, src in fam.GGUF_NAMES.items():
        for i in range(cfg.num_layers) if "{i}" in canon else [None]:
            c, s = (canon, src) if i is None else (canon.format(i=i), src.format(i=i))
            if s not in f.tensors:
                if c == "lm_head":
                    continue  # tied embeddings
                raise STIError(f"{f.path} lacks tensor {s!r}", "the file is not a complete model of its architecture")
            heads = getattr(cfg, fam.GGUF_ROPE_PERMUTED[canon]) if canon in fam.GGUF_ROPE_PERMUTED else 0
            plan.append((c, s, heads))
    for _, s, _ in plan:  # fail before any work
        check_supported(f.tensors[s], f.path)

    from tqdm import tqdm

    weights: dict[str, Any] = {}
    with tqdm(total=len(plan), desc=f"loading {f.path.name}", unit="tensor", leave=False,
              file=sys.stderr, disable=None if progress else True) as bar:
        for c, s, heads in plan:
            info = f.tensors[s]
            kind = _PACKED_KINDS.get(info.type_name) if packed and len(info.shape) == 2 else None
            if kind:
                from sti.lowbit import LowBitTensor

                raw = f.raw(s)
                weights[c] = LowBitTensor(kind, info.shape, unpermute_rope(raw, heads) if heads else raw)
            else:
                w = f.dequantize(s)
                weights[c] = unpermute_rope(w, heads) if heads else w
            bar.update(1)

    dtypes: dict[str, int] = {}
    for info in f.tensors.values():
        dtypes[info.type_name] = dtypes.get(info.type_name, 0) + info.nbytes
    return Checkpoint(family="llama", config=cfg, weights=weights, tokenizer=tokenizer, source=str(f.path),
                      chat_template=meta.get("tokenizer.chat_template"), special=gguf_special(meta),
                      source_dtypes=dtypes)
