"""Tokenizers: a byte-level BPE trained on the training text and cached on disk, or a named one.

Training a BPE on a few MB takes seconds, so no run depends on a download. The cache key is a hash of the
training text and the vocabulary size: the same corpus always gets the same tokenizer file back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import files

EOS = "<|endoftext|>"
_FORMAT = "bpe-bytelevel-v1"  # bump when the training recipe changes, so old cache entries are not reused


@dataclass
class TextTokenizer:
    """What the data pipeline needs from any tokenizer."""

    name: str
    vocab_size: int
    fingerprint: str  # identifies the vocabulary (keys the token cache)
    eos_id: int | None
    encode_batch: Callable[[list[str]], list[list[int]]]
    path: Path | None = None  # the cached file, for a trained BPE
    trained_now: bool = False  # True when this call trained it (the cache was empty)


def chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split ``text`` at line ends into pieces of about ``size`` characters (batched, parallel encoding)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style: every byte is a base token, so no text is out of vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _from_tokenizers(tok, name: str, path: Path | None = None, trained_now: bool = False) -> TextTokenizer:
    serialized = tok.to_str()

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in tok.encode_batch(texts, add_special_tokens=False)]

    return TextTokenizer(
        name=name,
        vocab_size=tok.get_vocab_size(),
        fingerprint=hashlib.sha256(serialized.encode()).hexdigest(),
        eos_id=tok.token_to_id(EOS),
        encode_batch=encode_batch,
        path=path,
        trained_now=trained_now,
    )


def cached_bpe(docs: list[str], vocab_size: int, cache_dir: Path) -> TextTokenizer:
    """Load the BPE trained on ``docs`` with ``vocab_size`` from the cache, training it on a miss."""
    from tokenizers import Tokenizer

    digest = hashlib.sha256(f"{_FORMAT}\0{vocab_size}".encode())
    for doc in docs:
        digest.update(hashlib.sha256(doc.encode("utf-8", errors="replace")).digest())
    path = Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{digest.hexdigest()[:20]}.json"
    if path.is_file():
        return _from_tokenizers(Tokenizer.from_file(str(path)), f"byte-level BPE {vocab_size} (cached)", path)
    tok = train_bpe((piece for doc in docs for piece in chunks(doc)), vocab_size)
    files.write_text(path, tok.to_str())
    return _from_tokenizers(tok, f"byte-level BPE {vocab_size} (trained)", path, trained_now=True)


def named_tokenizer(spec: str) -> TextTokenizer:
    """A ``tokenizer.json`` file, or a directory / hub name loaded with ``transformers.AutoTokenizer``."""
    path = Path(spec).expanduser()
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            return _from_tokenizers(Tokenizer.from_file(str(path)), str(path), path)
        except Exception as err:
            raise ValueError(f"--tokenizer {spec}: not a tokenizers JSON file ({err})") from err
    if spec.endswith(".json"):
        raise FileNotFoundError(f"--tokenizer {spec}: file does not exist")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as err:
        raise ValueError(
            f"--tokenizer {spec}: not a local tokenizer.json, and transformers could not load it as a "
            f"directory or hub name (offline? misspelled?): {err}"
        ) from err
    backend = getattr(tok, "backend_tokenizer", None)
    serialized = backend.to_str() if backend is not None else f"{type(tok).__name__}:{spec}:{len(tok)}"

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    return TextTokenizer(
        name=spec,
        vocab_size=len(tok),
        fingerprint=hashlib.sha256(serialized.encode()).hexdigest(),
        eos_id=tok.eos_token_id,
        encode_batch=encode_batch,
    )
