"""Throughput of the tokens stage against a bare ``Tokenizer.encode_batch`` loop on the same text.

    .venv/bin/python benchmarks/bench_tokenize.py [--paths GLOB ...] [--repeats 5] [--check]

The stage is timed end to end (``tokenize_corpus`` with a GIVEN tokenizer.json, so tokenizer
training is excluded; it is timed separately): resolve the files, the validation scan (read,
gunzip, decode, hash), the encoding pass (read again, split, encode, write train.bin / val.bin),
meta.json, the rename. The bare loop gets the same batches already in memory and does only what
any consumer of the tokenizer must: encode each batch and take the ids out (``Encoding.ids``),
with the same encode method as the stage (``encode_batch_fast`` where it exists).

Both run --repeats times, interleaved; the best time of each is compared (the machine may be
shared, and the best run is the one least disturbed). --check exits 1 if the stage's overhead
exceeds --max-overhead percent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from upcycling import tokenize as tk

REPO = Path(__file__).resolve().parents[1]


def bare_loop(tokenizer: Tokenizer, batches, method: str, take_ids: bool = True) -> int:
    """Encode every batch; return the number of ids, end-of-text tokens included."""
    encode = getattr(tokenizer, method)
    tokens = 0
    for _, texts, ends in batches:
        encodings = encode(texts, add_special_tokens=False)
        if take_ids:
            tokens += sum(len(encoding.ids) for encoding in encodings) + sum(ends)
    return tokens


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_with_cpu(fn):
    """(wall s, CPU s of this process's threads, result): CPU time shrugs off other jobs' load."""
    cpu_start = time.process_time()
    wall_s, result = timed(fn)
    return wall_s, time.process_time() - cpu_start, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=[str(REPO / "data/corpus/shakespeare/*.txt.gz")])
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-overhead", type=float, default=15.0, help="percent")
    parser.add_argument("--check", action="store_true", help="exit 1 if the overhead exceeds --max-overhead")
    args = parser.parse_args(argv)

    corpus_cfg = {"paths": args.paths, "text_field": args.text_field, "val_fraction": args.val_fraction,
                  "split_seed": 0}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_tokenize.") as scratch:
        scratch = Path(scratch)
        # A tokenizer to give the stage; training is timed on its own.
        trained_s, meta = timed(
            lambda: tk.tokenize_corpus(corpus_cfg, {"vocab_size": args.vocab_size, "path": None}, scratch / "trained")
        )
        tokenizer_path = scratch / "trained" / "tokenizer.json"
        sources = tk.resolve_sources(args.paths)
        training_texts = (
            piece.text
            for held_out, piece in tk._with_split(tk._iter_pieces(sources, args.text_field), args.val_fraction, 0)
            if not held_out
        )
        train_tokenizer_s, _ = timed(lambda: tk.train_tokenizer(training_texts, args.vocab_size, 2))

        # The bare loop's input: the stage's own batches, read beforehand.
        batches = list(tk._batches(tk._with_split(tk._iter_pieces(sources, args.text_field), args.val_fraction, 0)))
        corpus_bytes = sum(len(text.encode()) for _, texts, _ in batches for text in texts)
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.encode_special_tokens = True  # as the stage does
        method = "encode_batch_fast" if hasattr(tokenizer, "encode_batch_fast") else "encode_batch"
        given_cfg = {"vocab_size": args.vocab_size, "path": str(tokenizer_path)}

        stage_times, bare_times, stage_cpu, bare_cpu = [], [], [], []
        for _ in range(args.repeats):
            stage_s, cpu_s, stage_meta = timed_with_cpu(
                lambda: tk.tokenize_corpus(corpus_cfg, given_cfg, scratch / "given")
            )
            stage_times.append(stage_s)
            stage_cpu.append(cpu_s)
            bare_s, cpu_s, bare_tokens = timed_with_cpu(lambda: bare_loop(tokenizer, batches, method))
            bare_times.append(bare_s)
            bare_cpu.append(cpu_s)
        tokens = stage_meta["train_tokens"] + stage_meta["val_tokens"]
        assert bare_tokens == tokens == meta["train_tokens"] + meta["val_tokens"], (bare_tokens, tokens)
        plain_s = min(timed(lambda: bare_loop(tokenizer, batches, "encode_batch"))[0] for _ in range(2))
        no_ids_s = min(timed(lambda: bare_loop(tokenizer, batches, method, take_ids=False))[0] for _ in range(2))

    stage_best, bare_best = min(stage_times), min(bare_times)
    overhead = 100 * (stage_best / bare_best - 1)
    print(f"corpus: {len(sources)} files, {corpus_bytes / 1e6:.2f} MB of text, {tokens} tokens "
          f"(vocab {meta['vocab_size']}), {len(batches)} batches")  # fmt: skip
    print(f"tokenizer training (excluded below): {train_tokenizer_s:.2f} s; whole stage with training: {trained_s:.2f} s")
    print(f"{'':34s}{'best s':>8s}{'median s':>10s}{'tokens/s':>12s}{'MB/s':>8s}")
    rows = [
        ("stage (tokenize_corpus, given tok)", stage_times),
        (f"bare {method} + ids", bare_times),
    ]
    for label, times in rows:
        best = min(times)
        print(f"{label:34s}{best:8.3f}{statistics.median(times):10.3f}{tokens / best:12.0f}{corpus_bytes / best / 1e6:8.2f}")
    print(f"{'bare encode_batch + ids':34s}{plain_s:8.3f}{'':10s}{tokens / plain_s:12.0f}{corpus_bytes / plain_s / 1e6:8.2f}")
    print(f"{'bare ' + method + ', ids not taken':34s}{no_ids_s:8.3f}{'':10s}{tokens / no_ids_s:12.0f}"
          f"{corpus_bytes / no_ids_s / 1e6:8.2f}")  # fmt: skip
    cpu_overhead = 100 * (min(stage_cpu) / min(bare_cpu) - 1)
    print(f"CPU seconds, best of {args.repeats}: stage {min(stage_cpu):.3f}, bare {min(bare_cpu):.3f} "
          f"({cpu_overhead:+.1f}%)")  # fmt: skip
    print(f"stage overhead vs bare {method} + ids (wall, best of {args.repeats}): {overhead:+.1f}% "
          f"(limit {args.max_overhead:.0f}%)")  # fmt: skip
    if args.check and overhead > args.max_overhead:
        print("FAIL: the stage is slower than the bare loop by more than the limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
