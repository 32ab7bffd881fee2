"""How long a user waits: ``generate --prompt`` end to end, cold and warm, and ``--chat`` turns.

    python scripts/bench_cli_latency.py [--new-tokens 64] [--out benchmarks/results/cli_latency_cpu.md]

Runs the real CLI in fresh processes on SmolLM2-135M-Instruct (NF4 + double quant, the
built-in model), with an empty persistent compilation cache for the first run:
1. ``generate --prompt`` (cold: nothing compiled before), 2. the same command again
(warm: compiled programs come from ``$QLORA_JAX_CACHE/jax_compilation_cache``), 3. the
same with ``--no-compilation-cache`` (what every run cost before the cache), 4. a
``generate --chat`` process answering three turns (the seconds from sending a line to the
end of its reply, once the model is loaded; a longer history can reach a new prompt
bucket, compiled on first use),
5. a second chat process with the same turns, warm: every program comes from the cache.
The load average before and after is stated; new tokens are counted with the model's
tokenizer (a reply can end at EOS before ``--new-tokens``).
"""

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlora_jax import assets
from qlora_jax.tokenizer import load_tokenizer

PROMPT = "Write a long story about a dragon who learns to bake bread."
TURNS = ["Hi! Tell me about your favourite city.", "Why do you like it?", "What should I see there first?"]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qlora_jax.generate", "--model", "smollm2-135m-instruct", *args]


def timed_prompt(env: dict, new_tokens: int, *extra: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(_command("--prompt", PROMPT, "--max-new-tokens", str(new_tokens), *extra),
                            capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - started, result.stdout.strip()


QUIET = 1.0  # seconds without output after a newline that end a reply (replies may hold newlines themselves)


def _read_reply(fd: int) -> tuple[float, str]:
    """Read one streamed reply; returns (when its last byte came, text)."""
    data, last = b"", time.perf_counter()
    while True:
        ready, _, _ = select.select([fd], [], [], QUIET if data.endswith(b"\n") else 120)
        if not ready:
            return last, data.decode(errors="replace")
        chunk = os.read(fd, 4096)
        if not chunk:
            return last, data.decode(errors="replace")
        data, last = data + chunk, time.perf_counter()


def chat_turns(env: dict, new_tokens: int) -> list[tuple[float, str]]:
    process = subprocess.Popen(_command("--chat", "--max-new-tokens", str(new_tokens)), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    while not process.stderr.readline().startswith(b"chat:"):  # the model is loaded: the user can type
        pass
    turns = []
    for line in TURNS:
        started = time.perf_counter()
        process.stdin.write((line + "\n").encode())
        process.stdin.flush()
        finished, reply = _read_reply(process.stdout.fileno())
        turns.append((finished - started, reply.strip()))
    process.stdin.close()
    process.wait(timeout=60)
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = assets.prepared_smollm2()
    tokenizer = load_tokenizer(model_dir)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as cache:
        (Path(cache) / model_dir.name).symlink_to(model_dir)  # the converted model, an empty compile cache
        env = {**os.environ, "QLORA_JAX_CACHE": cache}
        cold, cold_text = timed_prompt(env, args.new_tokens)
        warm, warm_text = timed_prompt(env, args.new_tokens)
        uncached, _ = timed_prompt(env, args.new_tokens, "--no-compilation-cache")
        turns = chat_turns(env, args.new_tokens)
        warm_turns = chat_turns(env, args.new_tokens)
        cache_mib = sum(p.stat().st_size for p in Path(cache, "jax_compilation_cache").iterdir()) / 2**20
        shutil.rmtree(Path(cache, "jax_compilation_cache"))
    load_after = os.getloadavg()

    def tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    lines = [f"SmolLM2-135M-Instruct, NF4 + double quant, CPU ({os.cpu_count()} cores), --max-new-tokens "
             f"{args.new_tokens}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
             f"(python scripts/bench_cli_latency.py)", "",
             "| what | seconds | new tokens |", "|---|---|---|",
             f"| `generate --prompt`, first run (empty compilation cache) | {cold:.1f} | {tokens(cold_text)} |",
             f"| `generate --prompt`, second run (compiled programs from the cache) | {warm:.1f} | "
             f"{tokens(warm_text)} |",
             f"| `generate --prompt --no-compilation-cache` | {uncached:.1f} | {tokens(warm_text)} |"]
    lines += [f"| `generate --chat`, first session, turn {i} (send line -> reply done) | {seconds:.1f} | "
              f"{tokens(reply)} |" for i, (seconds, reply) in enumerate(turns, start=1)]
    lines += [f"| `generate --chat`, second session (warm), turn {i} | {seconds:.1f} | {tokens(reply)} |"
              for i, (seconds, reply) in enumerate(warm_turns, start=1)]
    lines += ["", f"Compilation cache after these runs: {cache_mib:.1f} MiB. The same reply both runs: "
              f"{cold_text == warm_text}."]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
