"""`serve` under load: text queries against a large index, by 1, 8 and 32 concurrent clients,
against the `search` command's cold start (a new process per query).

    python -m benchmarks.serve                                    # tiny text encoder, 100,000 rows
    python -m benchmarks.serve --text-model /work/real-models/all-MiniLM-L6-v2 --requests 640

1. A made-up run (random linear heads to 256-d, `benchmarks.model.made_up_run`) around the text
   encoder, and an index of `--rows` random unit vectors written as the `index` command does
   (exact IndexFlatIP, the same artifact: `search` and `serve` read it through `open_index`).
2. Baseline: `python -m pipeline search --index IX "a query"` as a new process, wall time, the
   best of `--cold-runs`.
3. `python -m pipeline serve` as a subprocess; its start-up time to the first answer; then for
   each client count, `--requests` text queries (each distinct, so nothing is cached) sent by
   that many threads, each on its own keep-alive connection: p50 / p99 latency, requests/s,
   errors, and the server's resident memory after each round (flat memory: no growth per
   request). The clients share the machine with the server, as they would on a laptop.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import requests

from benchmarks.model import made_up_run
from stages.index import INDEX, INDEX_FILE, ROWS_FILE, make_index
from stages.model import run_id
from stages.vectors import unit_rows_f32
from store.artifacts import write_artifact

PIPELINE = [sys.executable, "-m", "pipeline", "--params", "/dev/null"]


def random_index(run: Path, out: Path, rows: int, dim: int) -> None:
    """An INDEX artifact of `rows` random unit vectors, as `index` writes one for `run`."""
    import faiss

    vectors = unit_rows_f32(np.random.default_rng(0).standard_normal((rows, dim), np.float32))
    index, kind, recall = make_index(vectors)
    table = pd.DataFrame(
        {
            "image_row": np.arange(rows),
            "id": [f"img-{i}" for i in range(rows)],
            "path": "",
            "label_name": "",
        }
    )
    meta = {
        "run": str(run.resolve()),
        "run_id": run_id(run),
        "store": "",
        "dataset": "random",
        "split": "test",
        "image_model": "random",
        "image_layer": "none",
        "rows": rows,
        "dim": dim,
        "kind": kind,
        "recall_at_10_vs_exact": recall,
    }

    def fill(folder: Path) -> dict:
        faiss.write_index(index, str(folder / INDEX_FILE))
        table.to_parquet(folder / ROWS_FILE, index=False)
        return meta

    write_artifact(INDEX, out, fill)


def cold_search(run: Path, index: Path, runs: int) -> float:
    """Seconds of the best of `runs` `search` processes, each loading everything anew."""
    times = []
    for i in range(runs):
        start = time.perf_counter()
        command = [*PIPELINE, "search", "--index", str(index), "--run", str(run)]
        subprocess.run([*command, f"cold query {i}"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def start_server(run: Path, index: Path) -> tuple[subprocess.Popen, str, float]:
    start = time.perf_counter()
    command = [*PIPELINE, "serve", "--run", str(run), "--index", str(index), "--port", "0"]
    server = subprocess.Popen(
        [*command, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = server.stdout.readline()
    if not line.startswith("serving"):
        raise SystemExit(f"serve did not start: {line}{server.stderr.read()}")
    url = line.split(" at ")[1].split()[0].rstrip("/")
    requests.get(f"{url}/api/search", params={"q": "warm up", "k": 10}, timeout=60)
    return server, url, time.perf_counter() - start


def load_round(url: str, clients: int, n_requests: int, k: int, tag: str) -> dict:
    """`n_requests` distinct text queries from `clients` threads: latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_client = [list(range(c, n_requests, clients)) for c in range(clients)]

    def client(numbers: list[int]) -> None:
        with requests.Session() as session:
            for n in numbers:
                start = time.perf_counter()
                try:
                    params = {"q": f"a photo of thing {tag}-{n}", "k": k}
                    response = session.get(f"{url}/api/search", params=params, timeout=120)
                    ok = response.status_code == 200 and len(response.json()["results"]) == k
                    problem = None if ok else f"HTTP {response.status_code}"
                except requests.RequestException as err:
                    problem = type(err).__name__
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if problem:
                        errors.append(problem)

    threads = [threading.Thread(target=client, args=(numbers,)) for numbers in per_client]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = 1000 * np.asarray(latencies)
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "rate": n_requests / wall,
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-model", default="tiny-random-text")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=320, help="requests per client count")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = made_up_run(tmp, "tiny-random-vit", "block.1", args.text_model)
        random_index(run, tmp / "index", args.rows, args.dim)
        print(f"text model {args.text_model}; index of {args.rows:,} x {args.dim} (exact)")
        cold = cold_search(run, tmp / "index", args.cold_runs)
        print(f"  `search` cold start (new process, one query): {cold:.2f} s  (the baseline)")
        server, url, started = start_server(run, tmp / "index")
        process = psutil.Process(server.pid)
        try:
            rss = process.memory_info().rss / 2**20
            print(f"  `serve` start-up to its first answer: {started:.2f} s, RSS {rss:.0f} MiB")
            for round_, clients in enumerate(int(c) for c in args.clients.split(",")):
                result = load_round(url, clients, args.requests, args.k, f"r{round_}")
                rss = process.memory_info().rss / 2**20
                print(
                    f"  {clients:3} clients, {args.requests} requests: p50 {result['p50']:7.1f} ms "
                    f"({cold * 1000 / result['p50']:5.0f}x faster than cold), p99 "
                    f"{result['p99']:7.1f} ms, {result['rate']:6.1f} req/s, errors "
                    f"{result['errors']}, server RSS {rss:.0f} MiB"
                )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
