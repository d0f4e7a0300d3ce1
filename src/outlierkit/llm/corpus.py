"""Calibration/evaluation text: files, directories, JSONL, local ``datasets``, and a built-in default.

The default corpus needs nothing downloaded: it is drawn from what every CPython installation carries,
in three domains: English prose (the interpreter's help topics in ``pydoc_data``), technical prose
(standard-library docstrings) and code (standard-library source). Sampling is deterministic by seed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from outlierkit.errors import ConfigError, DataError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".jsonl", ".json", ".py", ".csv", ".tex", ".html", ""}
_DOC_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "email", "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging",
    "math", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)
_SOURCE_FILES = (
    "heapq.py", "bisect.py", "fractions.py", "textwrap.py", "statistics.py", "functools.py", "shlex.py",
    "difflib.py", "colorsys.py", "graphlib.py", "queue.py", "calendar.py", "string.py", "base64.py",
)


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # where it came from: file path (+ line / record), or "default:<domain>:<name>"


def _paragraphs(text: str, min_chars: int = 400) -> list[str]:
    """Split on blank lines and merge consecutive paragraphs until each chunk has ``min_chars``.

    Text with no blank line at all but several lines (one paragraph per line, as in many plain-text corpora)
    is split on line breaks instead, so that it is not one giant document.
    """
    out: list[str] = []
    buf: list[str] = []
    size = 0
    text = text.replace("\r\n", "\n")
    sep = "\n\n" if "\n\n" in text.strip() or text.strip().count("\n") == 0 else "\n"
    for para in text.split(sep):
        para = para.strip()
        if not para:
            continue
        buf.append(para)
        size += len(para)
        if size >= min_chars:
            out.append("\n\n".join(buf))
            buf, size = [], 0
    if buf:
        out.append("\n\n".join(buf))
    return out


def default_documents() -> list[Document]:
    """The built-in multi-domain corpus (prose, docstrings, code) from this Python installation."""
    docs: list[Document] = []
    topics: dict[str, str] = {}
    try:
        from pydoc_data import topics as _topics

        topics = dict(_topics.topics)
    except ImportError:  # stripped-down interpreters
        pass
    for name in sorted(topics):
        docs += [Document(p, f"default:prose:{name}") for p in _paragraphs(topics[name])]
    for modname in _DOC_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        texts = [inspect.getdoc(mod) or ""]
        with warnings.catch_warnings():  # typing.io/typing.re deprecation noise
            warnings.simplefilter("ignore", DeprecationWarning)
            for attr in sorted(vars(mod)):
                obj = getattr(mod, attr)
                if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                    if getattr(obj, "__module__", None) == mod.__name__:
                        texts.append(inspect.getdoc(obj) or "")
        joined = "\n\n".join(t for t in texts if t)
        docs += [Document(p, f"default:docstrings:{modname}") for p in _paragraphs(joined)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for fname in _SOURCE_FILES:
        f = stdlib / fname
        if f.is_file():
            code = f.read_text(encoding="utf-8", errors="replace")
            docs += [Document(p, f"default:code:{fname}") for p in _paragraphs(code, min_chars=800)]
    if not docs:
        raise DataError("this Python installation has no documentation or sources to build the default corpus; "
                        "pass --data with text files")
    return docs


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks binary (NUL bytes); pass text, JSONL or a directory of them")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it or pass another file") from None


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    docs = []
    for i, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{i} is not valid JSON; each line of a .jsonl file must be one object") from None
        if not isinstance(rec, dict) or text_field not in rec:
            keys = list(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{path}:{i} has no {text_field!r} field (has {keys}); pass --text-field NAME")
        if isinstance(rec[text_field], str) and rec[text_field].strip():
            docs.append(Document(rec[text_field], f"{path}:{i}"))
    return docs


def _dataset_documents(path: Path, text_field: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved `datasets` dataset but the datasets package is not installed") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors, ...
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"cannot load the saved dataset {path}: {detail}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[sorted(ds.keys())[0]]
    if text_field not in ds.column_names:
        raise DataError(f"dataset {path} has no column {text_field!r} (has {ds.column_names}); pass --text-field")
    return [Document(t, f"{path}#{i}") for i, t in enumerate(ds[text_field]) if isinstance(t, str) and t.strip()]


def load_documents(paths: Sequence[str | Path] | None, *, text_field: str = "text") -> list[Document]:
    """Documents from text files, directories (recursive), JSONL, or saved datasets; default corpus if None."""
    if not paths:
        return default_documents()
    docs: list[Document] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data path {p} does not exist")
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            docs += _dataset_documents(p, text_field)
            continue
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                       and not f.name.startswith(".")) if p.is_dir() else [p]
        for f in files:
            if f.suffix.lower() == ".jsonl":
                docs += _jsonl_documents(f, text_field)
            else:
                docs += [Document(t, str(f)) for t in _paragraphs(_read_text_file(f))]
    if not docs:
        raise DataError(f"no text found in {', '.join(map(str, paths))}; the files are empty")
    return docs


@dataclass
class Batch:
    """Right-padded token batch; ``sample_ids`` index into the corpus sample list."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    sample_ids: list[int]


@dataclass
class TokenCorpus:
    """Tokenized samples (each at most ``seq_len`` tokens) in a deterministic order."""

    samples: list[list[int]]
    sources: list[str]
    seq_len: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def subset(self, ids: Sequence[int]) -> TokenCorpus:
        return TokenCorpus([self.samples[i] for i in ids], [self.sources[i] for i in ids], self.seq_len, self.pad_id)

    def batches(self, batch_size: int, *, sort_by_length: bool = True, offset: int = 0) -> list[Batch]:
        """Batches of similar-length samples (less padding); ``sample_ids`` are offset by ``offset``."""
        order = list(range(len(self.samples)))
        if sort_by_length:
            order.sort(key=lambda i: (-len(self.samples[i]), i))
        out = []
        for start in range(0, len(order), batch_size):
            ids = order[start:start + batch_size]
            width = max(len(self.samples[i]) for i in ids)
            input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, i in enumerate(ids):
                s = self.samples[i]
                input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[row, : len(s)] = 1
            out.append(Batch(input_ids, mask, [offset + i for i in ids]))
        return out

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for s in self.samples:
            h.update(torch.tensor(s, dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


def build_corpus(
    tokenizer: Any,
    documents: Sequence[Document],
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    min_tokens: int = 8,
    max_length: int | None = None,
    vocab_size: int | None = None,
) -> TokenCorpus:
    """Shuffle documents by seed, tokenize, keep ``samples`` samples of ``min_tokens``..``seq_len`` tokens.

    With ``vocab_size`` (the model's embedding rows), a token id the model has no row for is a clear error
    (the tokenizer belongs to another model) instead of an index error deep inside the forward pass.
    """
    if samples < 1:
        raise ConfigError("--samples must be at least 1")
    if seq_len < 2:
        raise ConfigError("--seq-len must be at least 2")
    if max_length is not None and seq_len > max_length:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's maximum of {max_length} positions; "
                          f"use --seq-len {max_length} or less")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    min_tokens = min(min_tokens, seq_len)  # a short --seq-len caps every sample below the default minimum
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    out: list[list[int]] = []
    sources: list[str] = []
    for i in order:
        ids = tokenizer(documents[i].text, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= min_tokens:
            out.append(list(ids))
            sources.append(documents[i].source)
            if len(out) == samples:
                break
    if not out:
        raise DataError(f"no document has at least {min_tokens} tokens; pass more or longer text with --data")
    top = max(max(ids) for ids in out)
    if vocab_size is not None and top >= vocab_size:
        raise DataError(f"the tokenizer produced token id {top} but the model's embedding has {vocab_size} rows: "
                        "the tokenizer files in the model directory belong to another model")
    if len(out) < samples:
        from outlierkit._utils.log import warning

        warning(f"only {len(out)} of the {samples} requested samples: the data has no more documents of at least "
                f"{min_tokens} tokens; pass more text with --data for the full count")
    return TokenCorpus(out, sources, seq_len, int(pad))


def iter_text_windows(tokenizer: Any, documents: Sequence[Document], *, window: int,
                      max_windows: int | None = None) -> Iterator[torch.Tensor]:
    """Perplexity protocol: join all text with blank lines, tokenize once, non-overlapping windows."""
    text = "\n\n".join(d.text for d in documents)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the joined text is longer than the model: that is the point here
    try:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    finally:
        hf_logging.set_verbosity(level)
    n = ids.numel() // window
    if n == 0:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {window}")
    for k in range(n if max_windows is None else min(n, max_windows)):
        yield ids[k * window:(k + 1) * window]
