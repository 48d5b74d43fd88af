"""Throughput of the tokens stage against a bare ``Tokenizer.encode_batch`` loop on the same text.

    .venv/bin/python benchmarks/bench_tokenize.py [--paths GLOB ...] [--repeats 5] [--check]

The stage is timed end to end: ``tokenize_corpus`` with a GIVEN tokenizer.json (tokenizer
training is timed on its own): resolve the files, the validation scan (read, gunzip, decode,
hash), the encoding pass (read again, split, encode, write train.bin / val.bin), meta.json, the
rename. The bare loop gets the stage's own batches, already in memory, and does only what any
user of the tokenizer must: encode each batch and take the ids out (``Encoding.ids``), with the
stage's encode method (``encode_batch_fast`` where it exists).

The two alternate --repeats times. The overhead checked is the median over repeats of the
stage's wall time over the bare loop's right after it (paired runs share the machine's load at
the time, which matters on a shared machine); the best-of-repeats ratio and CPU seconds are
printed too. --check exits 1 if that overhead exceeds --max-overhead percent.
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
    """(wall s, CPU s of all this process's threads, fn's result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=[str(REPO / "data/corpus/shakespeare/*.txt.gz")])
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-overhead", type=float, default=15.0, help="percent (default 15)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the overhead exceeds --max-overhead")
    args = parser.parse_args(argv)

    corpus_cfg = {"paths": args.paths, "text_field": args.text_field, "val_fraction": args.val_fraction,
                  "split_seed": 0}  # fmt: skip
    sources = tk.resolve_sources(args.paths)
    # The bare loop's input: the stage's own batches, read beforehand.
    batches = list(tk.iter_batches(sources, args.text_field, args.val_fraction, 0))
    corpus_bytes = sum(len(text.encode()) for _, texts, _ in batches for text in texts)
    training_texts = [text for split, texts, _ in batches if split == "train" for text in texts]

    with tempfile.TemporaryDirectory(prefix="bench_tokenize.") as scratch:
        scratch = Path(scratch)
        trained_s, _, meta = timed(
            lambda: tk.tokenize_corpus(corpus_cfg, {"vocab_size": args.vocab_size}, scratch / "trained")
        )
        train_tokenizer_s, _, _ = timed(lambda: tk.train_tokenizer(training_texts, args.vocab_size, 2))
        tokenizer_path = scratch / "trained" / "tokenizer.json"
        given_cfg = {"vocab_size": args.vocab_size, "path": str(tokenizer_path)}
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.encode_special_tokens = True  # as the stage does
        method = "encode_batch_fast" if hasattr(tokenizer, "encode_batch_fast") else "encode_batch"

        stage_runs, bare_runs = [], []  # (wall s, CPU s)
        for _ in range(args.repeats):
            wall, cpu, stage_meta = timed(lambda: tk.tokenize_corpus(corpus_cfg, given_cfg, scratch / "given"))
            stage_runs.append((wall, cpu))
            wall, cpu, bare_tokens = timed(lambda: bare_loop(tokenizer, batches, method))
            bare_runs.append((wall, cpu))
        tokens = stage_meta["train_tokens"] + stage_meta["val_tokens"]
        assert bare_tokens == tokens == meta["train_tokens"] + meta["val_tokens"], (bare_tokens, tokens)
        plain_s = min(timed(lambda: bare_loop(tokenizer, batches, "encode_batch"))[0] for _ in range(2))
        no_ids_s = min(timed(lambda: bare_loop(tokenizer, batches, method, False))[0] for _ in range(2))

    print(f"corpus: {len(sources)} files, {corpus_bytes / 1e6:.2f} MB of text, {tokens} tokens "
          f"(vocab {meta['vocab_size']}), {len(batches)} batches of up to {tk.BATCH_CHARS} characters")
    print(f"tokenizer training: {train_tokenizer_s:.2f} s (excluded below); "
          f"the whole stage with training: {trained_s:.2f} s")
    print(f"{'':38s}{'best s':>8s}{'median s':>10s}{'tokens/s':>12s}{'MB/s':>8s}{'CPU s':>8s}")

    def row(label, wall_times, cpu_times=()):
        best = min(wall_times)
        median = f"{statistics.median(wall_times):10.3f}" if len(wall_times) > 1 else " " * 10
        cpu = f"{min(cpu_times):8.3f}" if cpu_times else ""
        print(f"{label:38s}{best:8.3f}{median}{tokens / best:12.0f}{corpus_bytes / best / 1e6:8.2f}{cpu}")

    row("stage: tokenize_corpus, given tok.", [w for w, _ in stage_runs], [c for _, c in stage_runs])
    row(f"bare {method} + ids", [w for w, _ in bare_runs], [c for _, c in bare_runs])
    row("bare encode_batch + ids", [plain_s])
    row(f"bare {method}, ids not taken", [no_ids_s])  # fmt: skip

    overhead = 100 * (statistics.median(s[0] / b[0] for s, b in zip(stage_runs, bare_runs)) - 1)
    best_overhead = 100 * (min(w for w, _ in stage_runs) / min(w for w, _ in bare_runs) - 1)
    cpu_overhead = 100 * (min(c for _, c in stage_runs) / min(c for _, c in bare_runs) - 1)
    print(f"stage overhead vs bare {method} + ids: {overhead:+.1f}% wall, median of {args.repeats} "
          f"paired runs (limit {args.max_overhead:.0f}%); best of each {best_overhead:+.1f}%; "
          f"CPU s {cpu_overhead:+.1f}%")  # fmt: skip
    if args.check and overhead > args.max_overhead:
        print("FAIL: the stage is slower than the bare loop by more than the limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
