"""A tiny indexed image folder and a real server on a free port, for the `serve` tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.extract import ExtractOptions, extract
from stages.index import build_index
from stages.serve import Service, create_app, open_socket
from tests.model_helpers import tiny_run

COLOURS = ("red", "green", "blue")
N_PICS = 12


def build_pics(root: Path) -> dict[str, Path]:
    """12 random 24x24 PNG files with captions and labels (a pairs table), extracted with the
    tiny image encoder, a tiny run, and the run's index of them."""
    pics = root / "pics"
    pics.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_PICS):
        pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pics / f"p{i}.png")
        rows.append(
            {"image_path": f"pics/p{i}.png", "caption": f"picture {i}", "label": COLOURS[i % 3]}
        )
    pd.DataFrame(rows).to_csv(root / "pairs.csv", index=False)
    store = root / "features.zarr"
    opts = ExtractOptions(batch_size=16, block_rows=16, num_workers=0, progress=False)
    extract(str(store), "pics", "train", f"pairs:{root / 'pairs.csv'}", "tiny-random-vit", opts)
    run = tiny_run(root / "run")
    build_index(run, store, "pics", "train", root / "index")
    return {"root": root, "pics": pics, "store": store, "run": run, "index": root / "index"}


@contextmanager
def running(service: Service) -> Iterator[str]:
    """The app of `service` under uvicorn in a thread on a free port: yields its base URL."""
    import uvicorn

    sock = open_socket("127.0.0.1", 0)
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # not the main thread (older uvicorn)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        service.close()
