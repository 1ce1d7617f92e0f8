"""Heavy items on two cores: the sentiment workflow on multi -n 2 against two plain processes.

    .venv/bin/python bench/bench_yardstick.py [--quick] [articles]

The yardstick (issue 17) is what the machine gives two processes at that
moment: the sentiment example's own functions (make an article, tokenise it,
score it with AFINN and with VADER) in a plain loop, in one process over every
article, and in two forked processes over half of them each. Against it:
``aiod4p run examples/science/sentiment.py`` on simple and on multi -n 2 (the
whole workflow: the join and the aggregation per state besides). Every run is
a fresh command timed from start to exit (interpreter, imports and fork
included on every side); rounds interleave the four commands. Target: multi
-n 2 within 10% of the two plain processes. Writes bench/results/yardstick.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = "--quick" in sys.argv
ROUNDS = 3
SEED = 2017


def plain(articles: int, processes: int) -> None:
    """Score ``articles`` articles with the example's functions in ``processes`` forked processes."""
    sys.path.insert(0, str(ROOT / "examples" / "science"))
    import sentiment
    from afinn import Afinn
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    words = sentiment.lexicon_words()

    def work(numbers: range) -> None:
        afinn, vader = Afinn(), SentimentIntensityAnalyzer()
        for number in numbers:
            _, _, text, tokens = sentiment.tokenise(sentiment.article(number, SEED, words))
            sentiment.score_afinn(afinn, tokens)
            sentiment.score_vader(vader, text)

    children = []
    for part in range(processes):
        pid = os.fork()
        if pid == 0:
            work(range(part, articles, processes))
            os._exit(0)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        if status:
            raise SystemExit(f"a plain process failed ({status})")


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--quick"]
    articles = int(args[0]) if args else 1000 if QUICK else 6000
    aiod4p = [sys.executable, "-m", "aiod4p", "run", "examples/science/sentiment.py", "-q"]
    aiod4p += ["-d", json.dumps({"Articles": [{"size": {"articles": articles, "seed": SEED}}]})]
    cases = {
        "plain loop, one process": [sys.executable, __file__, "--plain", str(articles), "1"],
        "plain loop, two processes": [sys.executable, __file__, "--plain", str(articles), "2"],
        "aiod4p simple": [*aiod4p, "-m", "simple"],
        "aiod4p multi -n 2": [*aiod4p, "-m", "multi", "-n", "2"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, command in cases.items():
            times[name].append(timed(command))
            print(f"{name}: {times[name][-1]:.2f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    one = median["plain loop, one process"]
    lines = [
        "## Heavy items on two cores: sentiment against two plain processes (bench_yardstick.py)",
        "",
        f"`.venv/bin/python bench/bench_yardstick.py {articles}`: {articles:,} articles (about 4 ms of AFINN and VADER"
        " each). The plain loop runs the example's own functions (article, tokenise, both scores) without the join"
        " and the aggregation; every run is a fresh command timed from start to exit; median of"
        f" {ROUNDS} interleaved rounds.",
        "",
        "| run | seconds (median) | all rounds | speed-up over the plain loop in one process |",
        "| --- | ---: | --- | ---: |",
    ]
    for name, values in times.items():
        rounds = ", ".join(f"{value:.2f}" for value in values)
        lines.append(f"| {name} | {median[name]:.2f} | {rounds} | {one / median[name]:.2f}x |")
    ratio = median["plain loop, two processes"] / median["aiod4p multi -n 2"]
    verdict = "met" if ratio >= 0.9 else "NOT met"
    lines += [
        "",
        f"aiod4p multi -n 2 over aiod4p simple: {median['aiod4p simple'] / median['aiod4p multi -n 2']:.2f}x.",
        f"Target: multi -n 2 within 10% of two plain processes: {verdict} (it takes {1 / ratio:.2f}x their time).",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    (ROOT / "bench" / "results" / "yardstick.md").write_text(section)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plain"]:
        plain(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
