"""Back-pressure of writes: peak RSS of a PE writing many items in one call, against the same items fed lazily.

    .venv/bin/python bench/bench_write_loop.py [--quick] [items]

Each case runs in its own process (peak RSS is per process): a source whose
single ``produce()`` call loops ``self.write`` over every item, on the event
loop (an unmarked PE: its writes wait for credit in its greenlet) and
threaded (``threaded = True``: writes wait for credit); a generator source
yielding the same items (fed lazily); and the baseline of an interpreter
that only imports aiod4p. 1,000,000 items (``--quick``: 100,000). Writes
bench/results/write_loop.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

QUICK = "--quick" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--quick"]
ITEMS = int(ARGS[0]) if ARGS else 100_000 if QUICK else 1_000_000
HERE = Path(__file__).resolve().parent

CASE = """
import json, resource, sys, time
import aiod4p
from aiod4p import ConsumerPE, ProducerPE, WorkflowGraph

items, kind = int(sys.argv[1]), sys.argv[2]

class WriteLoop(ProducerPE):
    threaded = kind == "threaded write loop"

    def produce(self):
        for item in range(items):
            self.write("output", ("payload", item))

class Lazy(ProducerPE):
    def produce(self):
        for item in range(items):
            yield ("payload", item)

class Sink(ConsumerPE):
    def consume(self, item):
        pass

started = time.perf_counter()
if kind != "import only":
    graph = WorkflowGraph()
    graph.connect(Lazy() if kind == "generator (lazy)" else WriteLoop(), "output", Sink(), "input")
    aiod4p.run(graph, 1, mapping="async")
elapsed = time.perf_counter() - started
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": elapsed}))
"""

KINDS = ("import only", "generator (lazy)", "write loop on the loop", "threaded write loop")


def measure(kind: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CASE, str(ITEMS), kind], capture_output=True, text=True, check=True, cwd=HERE.parent
    )
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> None:
    results = {kind: measure(kind) for kind in KINDS}
    base = results["import only"]["rss_mb"]
    lazy = results["generator (lazy)"]
    lines = [
        "## Back-pressure of writes: one call writing many items",
        "",
        f"`.venv/bin/python bench/bench_write_loop.py {ITEMS}`: a source whose one `produce()` call writes {ITEMS:,}"
        " items into a sink (async mapping), each case in its own process; peak RSS above an interpreter that"
        " only imports aiod4p, against the same items yielded by a generator (fed lazily).",
        "",
        "| case | peak RSS MB | above import MB | vs lazy | seconds | time vs lazy |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, result in results.items():
        above = result["rss_mb"] - base
        lines.append(
            f"| {kind} | {result['rss_mb']:.0f} | {above:.0f} |"
            f" {above / max(lazy['rss_mb'] - base, 1):.1f}x | {result['seconds']:.2f} |"
            f" {result['seconds'] / max(lazy['seconds'], 1e-9):.1f}x |"
        )
    lines += [
        "",
        "Target: every write loop, unmarked (on the event loop) or threaded, stays near the lazy feed"
        " (memory bounded by channels x credits x batch).",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    out = HERE / "results" / "write_loop.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(section)


if __name__ == "__main__":
    main()
