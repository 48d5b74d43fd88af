"""The tokenizer of the tokens stage: byte-level BPE trained once on a sample, or a given one.

Public: ``make_tokenizer`` (the train_tokenizer job: write tokenizer.json), ``train_tokenizer``,
``load_tokenizer``, ``end_of_text_id``, ``tokenizer_sample``, ``pieces`` and ``exact_cuts``.

The sample. Each corpus file contributes its first training documents, up to an equal share of
``tokenizer.sample_bytes`` (all of a smaller file); the validation split is kept out. It depends
on the file list and the config, not on the shard count.

Pieces. Documents go to the tokenizer in pieces of at most PIECE_CHARS characters, each ending
just before a space or newline that follows a non-space character: the byte-level pre-tokenizer
never joins across such a point, so a document encoded piece by piece gets exactly the ids it
would get in one call (``exact_cuts`` says when a given tokenizer does not allow that).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from upcycling.core.publish import publish_json, sha256_file, temporary_sibling
from upcycling.data.corpus import CorpusError, CorpusOptions, Source, safe_cut
from upcycling.data.tokens import tokenizer_record_path

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
PIECE_CHARS = 1 << 16  # most characters handed to the tokenizer as one batch item


def piece_ends(text: str, limit: int | None = None) -> list[int]:
    """End offsets of consecutive pieces of text, each at most limit (default PIECE_CHARS) long;
    the last is len(text). limit 0: the whole text is one piece."""
    limit = PIECE_CHARS if limit is None else limit
    ends, start = [], 0
    while limit and len(text) - start > limit:
        start = safe_cut(text, start + limit, start)
        ends.append(start)
    ends.append(len(text))
    return ends


def pieces(text: str, limit: int | None = None) -> Iterator[str]:
    start = 0
    for end in piece_ends(text, limit):
        yield text[start:end]
        start = end


def exact_cuts(tokenizer: Tokenizer) -> bool:
    """Whether cutting a document at safe_cut points leaves its ids unchanged: so for byte-level
    pre-tokenization without a prefix space (GPT-2, Llama 3, Qwen, the tokenizers this stage
    trains); not for tokenizers that mark where a text starts (SentencePiece's Metaspace or a
    Prepend normalizer, as in Llama 2 and Mistral), which would mark every piece's start."""
    spec = json.loads(tokenizer.to_str())
    parts, stack = [], [spec.get("normalizer"), spec.get("pre_tokenizer")]
    while stack:  # every component, Sequences unpacked
        item = stack.pop()
        if isinstance(item, dict):
            parts.append(item)
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend(item)
    kinds = {part.get("type") for part in parts}
    byte_level = [part for part in parts if part.get("type") == "ByteLevel"]
    # Words are split by ByteLevel's own regex or by a Split before it (Llama 3); without either,
    # the whole text would be one pre-token.
    splits_words = all(p.get("use_regex", True) for p in byte_level) or "Split" in kinds
    return (
        bool(byte_level)
        and splits_words
        and not any(p.get("add_prefix_space") for p in byte_level)
        and not {"Prepend", "Metaspace"} & kinds
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, eot_token: str = EOT_TOKEN) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every byte is in the vocabulary, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a piece then encodes as it would inside its document.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eot_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike, eot_token: str = EOT_TOKEN) -> Tokenizer:
    """A tokenizer.json with an end-of-text token, or CorpusError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(
            f"tokenizer.path: {path} does not exist: give a Hugging Face tokenizer.json or set "
            f"tokenizer.path to null to train one on the corpus"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise CorpusError(
            f"tokenizer.path: {path} is not a loadable tokenizer.json ({exc}): give a file saved by "
            f"Hugging Face tokenizers or set tokenizer.path to null to train one"
        ) from exc
    end_of_text_id(tokenizer, eot_token, path)
    return tokenizer


def end_of_text_id(tokenizer: Tokenizer, eot_token: str, path: str | os.PathLike) -> int:
    """The id of the token that ends each document, or CorpusError if the tokenizer at path lacks it."""
    token_id = tokenizer.token_to_id(eot_token)
    if token_id is None:
        raise CorpusError(
            f"tokenizer.path: {path} has no '{eot_token}' token to end documents with: set "
            f"tokenizer.eot_token to its end-of-text token (e.g. '</s>' for Llama 2, '<|end_of_text|>' "
            f"for Llama 3), or set tokenizer.path to null to train one"
        )
    return token_id


def tokenizer_sample(sources: list[Source], options: CorpusOptions, sample_bytes: int) -> Iterator[str]:
    """Pieces of the training documents the tokenizer learns from (see the module doc)."""
    share = sample_bytes / len(sources)
    for source in sources:
        taken = 0
        reader = options.documents([source])
        try:
            for document in reader:
                if not document.held_out:
                    yield from pieces(document.text)
                    taken += document.size
                    if taken >= share:
                        break
        finally:
            reader.close()


def make_tokenizer(
    sources: list[Source],
    options: CorpusOptions,
    tokenizer_cfg: dict,
    out_path: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Write out_path: the given tokenizer.json byte for byte, or one trained on the sample."""
    out_path = Path(out_path)
    given = tokenizer_cfg.get("path")
    tmp = temporary_sibling(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    requested = None  # the vocabulary size asked of a trained tokenizer
    try:
        if given:
            given = Path(given) if os.path.isabs(given) or base_dir is None else Path(base_dir) / given
            tokenizer = load_tokenizer(given, tokenizer_cfg.get("eot_token", EOT_TOKEN))
            if tokenizer_cfg.get("vocab_size") not in (None, tokenizer.get_vocab_size()):
                logger.warning(
                    "tokenizer.vocab_size=%s ignored: the given %s has %d tokens",
                    tokenizer_cfg.get("vocab_size"),
                    given,
                    tokenizer.get_vocab_size(),
                )
            shutil.copyfile(given, tmp)  # byte for byte: the same hash as given
            logger.info("tokenizer: %s, given (%d tokens)", given, tokenizer.get_vocab_size())
        else:
            vocab_size = int(tokenizer_cfg.get("vocab_size", 8192))
            if vocab_size < 257:
                raise CorpusError(
                    f"tokenizer.vocab_size={vocab_size}: byte-level BPE needs at least 257 "
                    f"tokens (256 bytes and end-of-text)"
                )
            started = time.perf_counter()
            sample_bytes = int(tokenizer_cfg.get("sample_bytes", 10**9))
            counted = _Counted(tokenizer_sample(sources, options, sample_bytes))
            tokenizer = train_tokenizer(
                counted,
                vocab_size,
                int(tokenizer_cfg.get("min_frequency", 2)),
                tokenizer_cfg.get("eot_token", EOT_TOKEN),
            )
            if counted.chars == 0:
                raise CorpusError(
                    f"the training split is empty (the tokenizer's sample found no training "
                    f"document in the {len(sources)} corpus files, corpus.val_fraction="
                    f"{options.val_fraction}): lower corpus.val_fraction or add documents"
                )
            tokenizer.save(str(tmp))
            logger.info(
                "tokenizer: byte-level BPE, %d tokens, trained on %.1f M characters from %d files in %.1f s",
                tokenizer.get_vocab_size(),
                counted.chars / 1e6,
                len(sources),
                time.perf_counter() - started,
            )
            _warn_short_vocabulary(tokenizer.get_vocab_size(), vocab_size, tokenizer_cfg, counted.chars)
            requested = vocab_size
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    record = tokenizer_record_path(out_path)
    if requested is None:
        record.unlink(missing_ok=True)  # a given tokenizer's size is its own
    else:
        publish_json(
            record,
            {
                "tokenizer_sha256": sha256_file(out_path),
                "vocab_size_requested": requested,
                "vocab_size_reached": tokenizer.get_vocab_size(),
            },
        )
    return tokenizer


def _warn_short_vocabulary(reached: int, requested: int, tokenizer_cfg: dict, sample_chars: int) -> None:
    """BPE stops merging when no pair is frequent enough: a small sample gives fewer tokens than asked."""
    if reached < requested:
        logger.warning(
            "tokenizer.vocab_size=%d not reached: the sample (%.2f M characters, tokenizer.min_frequency=%s) "
            "gives only %d tokens; training uses %d (meta.json records both). Lower tokenizer.vocab_size to "
            "at most %d, or give more text (corpus.paths, tokenizer.sample_bytes)",
            requested,
            sample_chars / 1e6,
            tokenizer_cfg.get("min_frequency", 2),
            reached,
            reached,
            reached,
        )


def vocab_request(tokenizer_file: Path, tokenizer_sha256: str, vocab_size: int) -> dict:
    """meta.json's record of a trained tokenizer's vocabulary: the tokenizer.vocab_size asked for
    and whether the sample reached it (vocab_size, what training uses, is the size reached)."""
    try:
        record = json.loads(tokenizer_record_path(tokenizer_file).read_text())
    except (OSError, ValueError):
        return {}  # a given tokenizer, or one trained before the record existed
    if record.get("tokenizer_sha256") != tokenizer_sha256:
        return {}
    requested = int(record["vocab_size_requested"])
    if vocab_size < requested:
        logger.warning(
            "tokens: tokenizer.vocab_size=%d was not reached: the tokenizer has %d tokens (training uses %d)",
            requested,
            vocab_size,
            vocab_size,
        )
    return {"vocab_size_requested": requested, "vocab_size_reached": vocab_size >= requested}


class _Counted:
    """An iterator of texts that counts their characters and logs how far it got."""

    def __init__(self, texts: Iterator[str]):
        self.texts, self.chars = texts, 0

    def __iter__(self):
        last_log = time.perf_counter()
        for text in self.texts:
            self.chars += len(text)
            if time.perf_counter() - last_log > 10.0:
                last_log = time.perf_counter()
                logger.info("tokenizer: %.0f M characters of sample read", self.chars / 1e6)
            yield text
