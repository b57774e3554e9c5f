"""One photo end to end, as a user runs it: whole `aicrl caption PHOTO` processes (start-up, model
loading, decoding the photo, captioning), two model folders taking turns so that both see the same
machine load; prints the median seconds of each and their ratio as JSON.

    python benchmarks/process_speed.py OLD_MODEL NEW_MODEL --photo tests/samples/coffee.jpg
    python benchmarks/process_speed.py OLD_MODEL NEW_MODEL --photo tests/samples/astronaut.jpg --style humorous
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speed import machine  # benchmarks/speed.py: Python puts a script's own folder on the path

AICRL = Path(sys.executable).with_name("aicrl")


def run_once(model: str, photo: str, style: str | None) -> float:
    command = [str(AICRL), "caption", photo, "--model", model] + (["--style", style] if style else [])
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="model folder to compare against")
    parser.add_argument("new", help="model folder measured")
    parser.add_argument("--photo", default="tests/samples/coffee.jpg")
    parser.add_argument("--style", help="caption style (default: the model's first)")
    parser.add_argument("--runs", type=int, default=7, help="processes per model, alternating (default 7)")
    args = parser.parse_args()

    times: dict[str, list[float]] = {"old": [], "new": []}
    run_once(args.new, args.photo, args.style)  # warm the file cache
    for _ in range(args.runs):
        for name in times:
            times[name].append(run_once(getattr(args, name), args.photo, args.style))
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(json.dumps({"machine": machine(), "photo": args.photo, "style": args.style, "runs": args.runs,
                      "old_s": round(old, 3), "new_s": round(new, 3), "ratio": round(new / old, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
