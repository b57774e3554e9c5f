"""Load test of `aicrl serve`: many clients uploading photos at once.

    python benchmarks/serving_load.py [--clients 16] [--uploads 10] [--backend auto] [--max-batch 16]
                                      [--model DIR] [--images FOLDER] [--json]

Starts the server on 127.0.0.1 (a free port, a throwaway gallery), waits until it answers, then
each client posts its uploads one after the other (POST /api/captions, beam 3). Prints how many got
503 (busy), how many failed otherwise, latency p50/p95 of the answered ones, the throughput, and
the batches the server formed. Bounded: every request times out, the whole run too; the server is
stopped at the end. Needs only the base install (standard library HTTP client).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "samples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(url: str, name: str, data: bytes, timeout: float) -> tuple[int, float]:
    body, content_type = _multipart(name, data)
    request = urllib.request.Request(url, data=body, headers={"content-type": content_type}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except Exception:  # noqa: BLE001  (timeouts, resets: counted as errors)
        status = -1
    return status, time.perf_counter() - t0


def _wait_ready(base: str, server: subprocess.Popen, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the server did not answer within {limit:.0f} s")


def run(clients: int, uploads: int, backend: str, max_batch: int, model: str | None, images: Path,
        request_timeout: float = 60.0) -> dict:
    photos = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    payloads = [(p.name, p.read_bytes()) for p in photos]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "aicrl.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--db", str(Path(tmp) / "gallery.db"), "--backend", backend, "--max-batch", str(max_batch)]
        if model:
            command += ["--model", model]
        started = time.perf_counter()
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_ready(base, server, 120)
            ready = time.perf_counter() - started
            results: list[tuple[int, float]] = []
            lock = threading.Lock()

            def client(i: int) -> None:
                for j in range(uploads):
                    name, data = payloads[(i + j) % len(payloads)]
                    outcome = _post(base + "/api/captions", name, data, request_timeout)
                    with lock:
                        results.append(outcome)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(request_timeout * uploads + 30)
            seconds = time.perf_counter() - t0
            with urllib.request.urlopen(base + "/api/info", timeout=10) as response:
                info = json.loads(response.read())
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    ok = [t for status, t in results if status == 200]
    return {
        "clients": clients, "uploads_each": uploads, "backend": info.get("backend"), "max_batch": max_batch,
        "requests": len(results), "ok": len(ok), "busy_503": sum(s == 503 for s, _ in results),
        "errors": sum(s not in (200, 503) for s, _ in results),
        "p50_s": statistics.median(ok) if ok else None,
        "p95_s": sorted(ok)[min(len(ok) - 1, int(round(0.95 * (len(ok) - 1))))] if ok else None,
        "images_per_s": len(ok) / seconds, "seconds": seconds, "server_ready_s": ready,
        "batches": info.get("latency", {}).get("batches"), "largest_batch": info.get("latency", {}).get("largest_batch"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--uploads", type=int, default=10, help="uploads per client, one after the other")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (1: no batching)")
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--images", default=str(SAMPLES), help="folder of photos to upload")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run(args.clients, args.uploads, args.backend, args.max_batch, args.model, Path(args.images))
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['clients']} clients x {r['uploads_each']} uploads, backend {r['backend']}, max batch "
              f"{r['max_batch']}: {r['ok']}/{r['requests']} answered, {r['busy_503']} got 503, {r['errors']} "
              f"errors; p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s; {r['images_per_s']:.1f} images/s; "
              f"{r['batches']} batches, largest {r['largest_batch']}")
    return 0 if r["errors"] == 0 and r["busy_503"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
