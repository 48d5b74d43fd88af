"""Throughput and memory of the tokens stage.

    .venv/bin/python benchmarks/bench_tokenize.py [--repeats 5] [--check]          # overhead
    .venv/bin/python benchmarks/bench_tokenize.py --scale --gb 1 --threads 1 2      # 1 GB corpus

Overhead mode: the stage end to end (``tokenize_corpus`` with a GIVEN tokenizer.json: resolve the
files, the scan pass, the encoding pass, the sidecars, the gather, the renames) against a bare
``Tokenizer.encode_batch`` loop over the stage's own batches, already in memory. The two alternate
--repeats times; the overhead is the median over repeats of stage / bare wall time (paired runs
share the machine's load). --check exits 1 if it exceeds --max-overhead percent.

Scale mode: writes --gb GB of text as .jsonl.zst (Shakespeare's plays from data/corpus, repeated,
each copy a distinct document), trains the tokenizer on a --sample-mb sample, then runs the real
shard job (``tokenize_shard`` over the whole corpus) in a fresh process per --threads value
(RAYON_NUM_THREADS, read once per process) and reports wall time, tokens/s, tokens/s per core,
MB/s, bytes per token and the process's peak RSS (wait4's ru_maxrss): the figures behind
``tokenizer.tokens_per_s_per_core`` and ``tokenizer.bytes_per_token``, and the proof that memory
stays bounded. Repeated text is kinder to the tokenizer's word cache than a real corpus is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from upcycling.data import tokenize as tk
from upcycling.data.corpus import read_documents, resolve_sources

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = str(REPO / "data/corpus/shakespeare/*.txt.gz")


# ----------------------------------------------------------------------------------------------
# Overhead against a bare encode loop


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


def overhead(args) -> int:
    corpus_cfg = {"paths": args.paths, "text_field": args.text_field, "val_fraction": args.val_fraction}
    sources = resolve_sources(args.paths)
    options = tk.CorpusOptions(args.text_field, args.val_fraction, 0)
    batches = list(tk.iter_batches(options.documents(sources)))  # the bare loop's input, read beforehand
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

    print(
        f"corpus: {len(sources)} files, {corpus_bytes / 1e6:.2f} MB of text, {tokens} tokens "
        f"(vocab {meta['vocab_size']}), {len(batches)} batches of up to {tk.BATCH_CHARS} characters"
    )
    print(
        f"tokenizer training: {train_tokenizer_s:.2f} s (excluded below); "
        f"the whole stage with training: {trained_s:.2f} s"
    )
    print(f"{'':38s}{'best s':>8s}{'median s':>10s}{'tokens/s':>12s}{'MB/s':>8s}{'CPU s':>8s}")

    def row(label, wall_times, cpu_times=()):
        best = min(wall_times)
        median = f"{statistics.median(wall_times):10.3f}" if len(wall_times) > 1 else " " * 10
        cpu = f"{min(cpu_times):8.3f}" if cpu_times else ""
        print(f"{label:38s}{best:8.3f}{median}{tokens / best:12.0f}{corpus_bytes / best / 1e6:8.2f}{cpu}")

    row("stage: tokenize_corpus, given tok.", [w for w, _ in stage_runs], [c for _, c in stage_runs])
    row(f"bare {method} + ids", [w for w, _ in bare_runs], [c for _, c in bare_runs])
    row("bare encode_batch + ids", [plain_s])
    row(f"bare {method}, ids not taken", [no_ids_s])

    ratio = 100 * (statistics.median(s[0] / b[0] for s, b in zip(stage_runs, bare_runs)) - 1)
    best_ratio = 100 * (min(w for w, _ in stage_runs) / min(w for w, _ in bare_runs) - 1)
    cpu_ratio = 100 * (min(c for _, c in stage_runs) / min(c for _, c in bare_runs) - 1)
    print(
        f"stage overhead vs bare {method} + ids: {ratio:+.1f}% wall, median of {args.repeats} paired runs "
        f"(limit {args.max_overhead:.0f}%); best of each {best_ratio:+.1f}%; CPU s {cpu_ratio:+.1f}%"
    )
    if args.check and ratio > args.max_overhead:
        print("FAIL: the stage is slower than the bare loop by more than the limit", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# Scale: a generated corpus, the real shard job, 1..n threads


def write_corpus(directory: Path, gigabytes: float, files: int) -> int:
    """Shakespeare's plays repeated as JSON Lines in zstd files, about gigabytes of text; its bytes."""
    import zstandard

    plays = [text for source in resolve_sources(SHAKESPEARE) for text in read_documents(source)]
    target, written, copy = gigabytes * 1e9, 0, 0
    per_file = target / files
    compressor = zstandard.ZstdCompressor(level=3, threads=-1)
    for index in range(files):
        with open(directory / f"chunk_{index:04d}.jsonl.zst", "wb") as raw, compressor.stream_writer(raw) as out:
            in_file = 0
            while in_file < per_file:
                text = f"Copy {copy}.\n" + plays[copy % len(plays)]  # a distinct document each time
                line = (json.dumps({"text": text, "meta": {"copy": copy}}) + "\n").encode()
                out.write(line)
                in_file += len(text.encode())
                copy += 1
        written += in_file
    return written


def run_child(code: str, env: dict) -> tuple[float, float, float, dict]:
    """Run python -c code in a fresh process; (wall s, CPU s, peak RSS MB, the JSON it printed last)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    output = process.stdout.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"child failed ({process.returncode}):\n{output[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, json.loads(output.strip().splitlines()[-1])


CHILD_PRELUDE = """
import json, sys
from upcycling.data import tokenize as tk
from upcycling.data.corpus import resolve_sources
sources = resolve_sources({paths!r})
options = tk.CorpusOptions("text", 0.1, 0)
"""


def scale(args) -> int:
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_scale.", dir=args.workdir) as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus"
        corpus.mkdir()
        started = time.perf_counter()
        text_bytes = write_corpus(corpus, args.gb, args.files)
        disk = sum(p.stat().st_size for p in corpus.iterdir())
        print(
            f"corpus: {args.files} .jsonl.zst files, {text_bytes / 1e9:.2f} GB of text, {disk / 1e6:.0f} MB on "
            f"disk (written in {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        prelude = CHILD_PRELUDE.format(paths=str(corpus / "*.jsonl.zst"))
        env = dict(os.environ, RAYON_NUM_THREADS=str(max(args.threads)), OMP_NUM_THREADS="1")
        tokenizer_cfg = {"vocab_size": args.vocab_size, "sample_bytes": int(args.sample_mb * 1e6)}
        wall, _, rss, _ = run_child(
            prelude
            + f"""
tk.make_tokenizer(sources, options, {tokenizer_cfg!r}, {str(scratch / "tokenizer.json")!r})
print(json.dumps({{}}))""",
            env,
        )
        print(
            f"tokenizer: vocab {args.vocab_size}, trained on a {args.sample_mb:.0f} MB sample in {wall:.1f} s "
            f"({max(args.threads)} threads), peak RSS {rss:.0f} MB",
            flush=True,
        )

        rows = []
        for threads in args.threads:
            env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS="1")
            out = scratch / f"shard_{threads}"
            wall, cpu, rss, sidecar = run_child(
                prelude
                + f"""
sidecar = tk.tokenize_shard(sources, options, {str(scratch / "tokenizer.json")!r}, {str(out)!r})
print(json.dumps(sidecar))""",
                env,
            )
            tokens = sidecar["train_tokens"] + sidecar["val_tokens"]
            rows.append((threads, wall, cpu))
            # Tokens per CPU second is the per-core rate even when other processes share the cores.
            print(
                f"threads {threads}: {wall:7.1f} s wall, {cpu:7.1f} s CPU, {tokens / wall:9.0f} tokens/s, "
                f"{tokens / cpu:9.0f} tokens per CPU s, {text_bytes / wall / 1e6:6.2f} MB/s, "
                f"{text_bytes / tokens:.2f} bytes/token, peak RSS {rss:.0f} MB, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            import shutil

            shutil.rmtree(out)
        if len(rows) > 1:
            base = rows[0]
            for threads, wall, cpu in rows[1:]:
                speedup = base[1] / wall
                print(
                    f"scaling {base[0]} -> {threads} threads: {speedup:.2f}x wall "
                    f"({100 * speedup / (threads / base[0]):.0f}% parallel efficiency), CPU s x{cpu / base[2]:.2f} "
                    f"(the machine's load average is printed per run: above the thread count, cores were shared)"
                )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=[SHAKESPEARE])
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 2048 (overhead), 32768 (scale)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-overhead", type=float, default=15.0, help="percent (default 15)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the overhead exceeds --max-overhead")
    parser.add_argument("--scale", action="store_true", help="the generated-corpus benchmark instead")
    parser.add_argument("--gb", type=float, default=1.0, help="scale: GB of text to generate")
    parser.add_argument("--files", type=int, default=8, help="scale: .jsonl.zst files to spread it over")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="scale: thread counts to run")
    parser.add_argument("--sample-mb", type=float, default=20.0, help="scale: tokenizer sample, MB")
    parser.add_argument("--workdir", default=None, help="scale: where the corpus goes (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.scale:
        args.vocab_size = args.vocab_size or 32768
        return scale(args)
    args.vocab_size = args.vocab_size or 2048
    return overhead(args)


if __name__ == "__main__":
    sys.exit(main())
