"""Training text: where it comes from, how it is split and tokenized, and which windows each step sees.

Sources: the built-in corpus (the Python standard library's source, on every machine with Python), local
.txt/.jsonl/.json/.parquet files, or a Hugging Face hub dataset streamed through ``datasets``.

Every step's batch is a pure function of (seed, step): random windows of ``seq_len + 1`` tokens drawn from
a generator seeded with both. Compared optimizers therefore see identical data, a resumed run sees what
the uninterrupted run would have seen, and the global batch does not depend on how many processes share it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import corpus, files
from .tokenizer import TextTokenizer, chunks

LOCAL_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".parquet")
_TXT_DOC_CHARS = 16_384  # a .txt file is cut into documents of about this size for the held-out split


@dataclass
class Corpus:
    """Documents of each split, and a line that says where they came from."""

    train: list[str]
    heldout: list[str]
    description: str

    def sample(self, max_chars: int) -> list[str]:
        """The first ``max_chars`` of training documents (what the BPE tokenizer is trained on)."""
        out, size = [], 0
        for doc in self.train:
            out.append(doc[: max_chars - size])
            size += len(out[-1])
            if size >= max_chars:
                break
        return out


# ----------------------------------------------------------------------------------------------- sources
def _is_heldout(doc: str, fraction: float) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


class _Splitter:
    """Assign documents to train/held-out by a hash of their text until both splits are full."""

    def __init__(self, max_train: int, max_heldout: int, fraction: float) -> None:
        self.limits = {"train": max_train, "heldout": max_heldout}
        self.docs: dict[str, list[str]] = {"train": [], "heldout": []}
        self.size = {"train": 0, "heldout": 0}
        self.fraction = fraction
        self.read = 0

    def add(self, doc: str, split: str | None = None) -> None:
        if not doc.strip():
            return
        raw = doc.encode("utf-8", errors="replace")
        self.read += len(raw)
        split = split or ("heldout" if _is_heldout(doc, self.fraction) else "train")
        if self.size[split] < self.limits[split]:
            room = self.limits[split] - self.size[split]
            if len(raw) > room:  # the last document is cut to fit, at a character boundary
                doc = raw[:room].decode("utf-8", errors="ignore")
            self.docs[split].append(doc)
            self.size[split] += min(len(raw), room)

    def train_full(self) -> bool:
        return self.size["train"] >= self.limits["train"]

    def done(self) -> bool:
        # Held-out documents are rare (a few percent): once training text is full, read on for them only
        # while the extra reading stays bounded.
        if not self.train_full():
            return False
        return self.size["heldout"] >= self.limits["heldout"] or self.read > 4 * sum(self.limits.values())

    def finish(self) -> tuple[list[str], list[str]]:
        train, heldout = self.docs["train"], self.docs["heldout"]
        if not heldout and len(train) > 1:
            heldout.append(train.pop())
        elif not heldout and train:
            # A single small document: hold out its tail, cut at a line end.
            text = train.pop()
            cut = text.rfind("\n", 0, int(len(text) * (1 - self.fraction)))
            cut = cut if cut > 0 else int(len(text) * (1 - self.fraction))
            train.append(text[:cut])
            heldout.append(text[cut:])
        return train, heldout


def builtin_corpus(max_train_bytes: int, max_eval_bytes: int) -> Corpus:
    """The Python standard library's source, split by file (``subspace_optim.pretrain.corpus``)."""
    train = corpus.stdlib_text(max_train_bytes, split="train")
    heldout = corpus.stdlib_text(max_eval_bytes, split="heldout")
    root = Path(corpus.stdlib_files()[0]).parent
    return Corpus(chunks(train), chunks(heldout), f"builtin: Python standard library source under {root}")


def local_files(spec: str) -> list[Path]:
    """Files named by a path, a directory (searched recursively) or a glob, in sorted order."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix.lower() in LOCAL_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"--dataset {spec}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return found
    if glob.has_magic(spec):
        matches = glob.glob(os.path.expanduser(spec), recursive=True)
        found = sorted(Path(match) for match in matches if Path(match).is_file())
        if not found:
            raise FileNotFoundError(f"--dataset {spec}: the pattern matches no files")
        return found
    raise FileNotFoundError(_missing(spec))


# Suffixes that mark a file, not a hub repository: hub names may carry dots too (org/wiki.en, data-1.0).
_FILE_SUFFIXES = frozenset(LOCAL_SUFFIXES) | {".csv", ".tsv", ".arrow", ".gz", ".zst", ".bz2", ".xz", ".zip", ".tar"}


def looks_like_path(spec: str) -> bool:
    """A dataset spec that can only be meant as a local path (a hub name is 'name' or 'owner/name').

    Local: a leading ``.``, ``/`` or ``~``, a trailing ``/``, a data-file suffix on the last component, a
    glob, more than one ``/``, or the platform's own separator. ``owner/name`` and ``name`` stay hub names
    unless they exist here.
    """
    name = spec.rstrip("/").rsplit("/", 1)[-1]
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith("/")
        or Path(name).suffix.lower() in _FILE_SUFFIXES
        or glob.has_magic(spec)
        or spec.count("/") > 1
        or os.sep != "/"
        and os.sep in spec
    )


def _missing(spec: str) -> str:
    """The 'no such path' message for --dataset ``spec``, with the absolute path that was looked for."""
    where = Path(spec).expanduser().absolute()
    shown = f" ({where} does not exist)" if str(where) != spec else ""
    return (
        f"--dataset {spec}: no such file or directory{shown}; give an existing folder or file, "
        "or a Hugging Face hub dataset name such as allenai/c4"
    )


def _field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no {text_field!r} field (has {keys}); choose the column with --text-field")
    value = record[text_field]
    return value if isinstance(value, str) else str(value)


def _documents(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise ValueError(
                f"{path}: no {text_field!r} column (has {table.schema_arrow.names}); choose it with --text-field"
            )
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            yield from (str(text) for text in batch.column(0).to_pylist() if text is not None)
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            first = f.read(1)
            f.seek(0)
            if suffix == ".json" and first == "[":
                for i, record in enumerate(json.load(f)):
                    yield _field(record, text_field, f"{path} item {i}")
                return
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{i}: not a JSON line ({err})") from err
                    yield _field(record, text_field, f"{path}:{i}")
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from chunks(text, _TXT_DOC_CHARS)


def local_corpus(spec: str, text_field: str, max_train: int, max_heldout: int, fraction: float) -> Corpus:
    paths = local_files(spec)
    splitter = _Splitter(max_train, max_heldout, fraction)
    for path in paths:
        for doc in _documents(path, text_field):
            splitter.add(doc)
            if splitter.done():
                break
        if splitter.done():
            break
    train, heldout = splitter.finish()
    if not train:
        raise ValueError(f"--dataset {spec}: no text found in {len(paths)} file(s)")
    return Corpus(train, heldout, f"local: {spec} ({len(paths)} file(s), {len(train) + len(heldout)} documents)")


def hub_corpus(
    name: str, config: str | None, text_field: str, max_train: int, max_heldout: int, fraction: float
) -> Corpus:
    """Stream a hub dataset; use its validation split for held-out text when it has one."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is in the train extra
        raise ImportError("a hub dataset needs `datasets`: pip install 'subspace-optim[train]'") from err

    def stream(split: str) -> Iterable[dict]:
        return datasets.load_dataset(name, config, split=split, streaming=True)

    try:
        train_stream = stream("train")
    except Exception as err:
        where = Path(name).expanduser().absolute()
        raise ValueError(
            f"--dataset {name}: there is no local file or folder {name} ({where} does not exist), and loading "
            f"it as a Hugging Face hub dataset failed (network? name? a configuration such as --dataset-config "
            f"en?): {err}. For local data give an existing folder or file (a folder may end in /)."
        ) from err
    splitter = _Splitter(max_train, max_heldout, fraction)
    validation = None
    try:
        validation = stream("validation")
    except Exception:  # no validation split: held-out documents come from train by hash
        validation = None
    for i, record in enumerate(train_stream):
        splitter.add(_field(record, text_field, f"{name} train row {i}"), "train" if validation else None)
        if splitter.train_full() if validation else splitter.done():
            break
    if validation is not None:
        for i, record in enumerate(validation):
            splitter.add(_field(record, text_field, f"{name} validation row {i}"), "heldout")
            if splitter.size["heldout"] >= max_heldout:
                break
    train, heldout = splitter.finish()
    held = "validation split" if validation is not None else f"{fraction:.0%} of train by hash"
    return Corpus(train, heldout, f"hub: {name}{'/' + config if config else ''} (streamed; held out: {held})")


def load_corpus(cfg) -> Corpus:
    """The documents ``cfg.dataset`` names (see the module docstring)."""
    spec = cfg.dataset
    if spec == "builtin":
        return builtin_corpus(cfg.max_train_bytes, cfg.max_eval_bytes)
    if Path(spec).expanduser().exists() or looks_like_path(spec):
        return local_corpus(spec, cfg.text_field, cfg.max_train_bytes, cfg.max_eval_bytes, cfg.heldout_fraction)
    return hub_corpus(
        spec, cfg.dataset_config, cfg.text_field, cfg.max_train_bytes, cfg.max_eval_bytes, cfg.heldout_fraction
    )


# -------------------------------------------------------------------------------------------- tokens
def tokenize(docs: list[str], tokenizer: TextTokenizer, cache_dir: Path | None) -> Tensor:
    """All documents' tokens in order, an end-of-text token between documents, as int32; cached on disk."""
    key = None
    if cache_dir is not None:
        digest = hashlib.sha256(tokenizer.fingerprint.encode())
        for doc in docs:
            digest.update(hashlib.sha256(doc.encode("utf-8", errors="replace")).digest())
        key = Path(cache_dir) / "tokens" / f"{digest.hexdigest()[:24]}.pt"
        if key.is_file():
            return torch.load(key, weights_only=True)
    parts: list[Tensor] = []
    for start in range(0, len(docs), 256):
        ids: list[int] = []
        for seq in tokenizer.encode_batch(docs[start : start + 256]):
            ids.extend(seq)
            if tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
        parts.append(torch.tensor(ids, dtype=torch.int32))  # int32 chunks: 4 bytes a token, not a Python int
    tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    if key is not None:
        files.atomic_write(key, lambda tmp: torch.save(tokens, tmp))
    return tokens


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(f"pretrain-batch:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class TokenData:
    """Tokenized splits and the per-step sampling rule."""

    train: Tensor
    heldout: Tensor
    tokenizer: TextTokenizer
    description: str

    def check(self, seq_len: int) -> None:
        for split, tokens in (("training", self.train), ("held-out", self.heldout)):
            if tokens.numel() < seq_len + 2:
                raise ValueError(
                    f"the {split} text has {tokens.numel()} tokens, fewer than one sequence of --seq-len "
                    f"{seq_len} + 1: use more text (--max-train-bytes/--max-eval-bytes) or a shorter --seq-len"
                )

    def batch(self, step: int, seed: int, rows: int, seq_len: int) -> Tensor:
        """The global batch of optimizer step ``step``: ``rows`` windows of ``seq_len + 1`` tokens (int64)."""
        gen = torch.Generator().manual_seed(_step_seed(seed, step))
        starts = torch.randint(0, self.train.numel() - seq_len, (rows,), generator=gen)
        index = starts[:, None] + torch.arange(seq_len + 1)
        return self.train[index].long()

    def eval_windows(self, seq_len: int, max_windows: int) -> Tensor:
        """Consecutive, non-overlapping held-out windows of ``seq_len + 1`` tokens (the same every time)."""
        count = min(max_windows, (self.heldout.numel() - 1) // seq_len)
        index = torch.arange(count)[:, None] * seq_len + torch.arange(seq_len + 1)
        return self.heldout[index].long()
