"""`serve` as a client sees it: a real server on a free port, spoken to over HTTP. Answers are
checked against the model and float64 numpy; bad input must be one JSON message, never a 500."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from stages.heads import load_run
from stages.model import AlignedModel
from stages.serve import Limits, Service, exposure
from stages.serve.images import NoImage, recorded_image
from stages.serve.service import run_protocol
from store import FeatureStore
from tests.helpers import one_line_error, run_cli
from tests.serve_helpers import COLOURS, N_PICS, build_pics, running

LIMITS = Limits(max_upload_bytes=100_000, max_k=8, max_labels=4, max_texts=3, max_text_chars=50)


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict:
    return build_pics(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(pics) -> str:
    with running(Service(pics["run"], pics["index"], "cpu", LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def model(pics) -> AlignedModel:
    return AlignedModel.from_run(pics["run"], device="cpu")


def png(path: Path) -> bytes:
    return path.read_bytes()


def stored_images(pics) -> np.ndarray:
    """The run's image head on the stored features, float64 unit rows."""
    config, image_head, _ = load_run(pics["run"])
    array = FeatureStore(pics["store"]).open("pics", "train", "image", config["image_model"])
    with torch.no_grad():
        out = image_head(torch.from_numpy(array.read_layer(config["image_layer"]))).double()
    out = out.numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_text_search_ranks_as_float64_numpy(server, pics, model):
    query = "a picture of something"
    answer = requests.get(f"{server}/api/search", params={"q": query, "k": 5}, timeout=30).json()
    scores = stored_images(pics) @ model.encode_text([query]).double().numpy()[0]
    best = np.argsort(-scores)[:5]
    assert [r["rank"] for r in answer["results"]] == [1, 2, 3, 4, 5]
    assert [r["id"] for r in answer["results"]] == [f"p{i}" for i in best]
    np.testing.assert_allclose([r["score"] for r in answer["results"]], scores[best], atol=2e-3)
    for hit, row in zip(answer["results"], best, strict=True):
        assert hit["caption"] == f"picture {row}" and hit["label_name"] == COLOURS[row % 3]
        assert hit["image_url"] == f"/images/{row}"  # rows are in image order here
    assert answer["run"] == str(pics["run"].resolve()) and answer["ms"] > 0


def test_image_search_finds_the_image_itself(server, pics):
    files = {"image": ("q.png", png(pics["pics"] / "p7.png"), "image/png")}
    answer = requests.post(f"{server}/api/search", files=files, data={"k": 3}, timeout=30).json()
    top = answer["results"][0]
    assert top["id"] == "p7" and top["score"] > 0.999 and len(answer["results"]) == 3


def test_thumbnail_is_the_recorded_image(server, pics):
    response = requests.get(f"{server}/images/4", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    np.testing.assert_array_equal(served, np.asarray(Image.open(pics["pics"] / "p4.png")))


def test_classify_equals_the_model(server, pics, model):
    image = pics["pics"] / "p2.png"
    expected = model.classify([image], list(COLOURS), k=3)
    for data in ({"labels": "red, green,blue"}, {"labels": list(COLOURS)}):
        files = {"image": ("p2.png", png(image), "image/png")}
        answer = requests.post(f"{server}/api/classify", files=files, data=data, timeout=30)
        results = answer.json()["results"]
        assert [r["label"] for r in results] == [COLOURS[int(c)] for c in expected.top_classes[0]]
        probs = [r["probability"] for r in results]
        np.testing.assert_allclose(probs, expected.top_probs[0].numpy(), atol=1e-6)
        assert abs(sum(probs) - 1) < 1e-5


def test_embed_texts_and_an_image(server, pics, model):
    texts = ["a red square", "noise"]
    answer = requests.post(f"{server}/api/embed", data={"texts": texts}, timeout=30).json()
    vectors = np.array(answer["embeddings"])
    assert answer["modality"] == "text" and vectors.shape == (2, answer["dim"])
    np.testing.assert_allclose(vectors, model.encode_text(texts).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    files = {"image": ("p1.png", png(pics["pics"] / "p1.png"), "image/png")}
    answer = requests.post(f"{server}/api/embed", files=files, timeout=30).json()
    expected = model.encode_image(pics["pics"] / "p1.png").numpy()
    np.testing.assert_allclose(answer["embeddings"], expected, atol=1e-6)


def test_info_names_the_run_models_layers_and_index(server, pics):
    info = requests.get(f"{server}/api/info", timeout=30).json()
    config = json.loads((pics["run"] / "config.json").read_text())
    assert info["models"] == {"image": config["image_model"], "text": config["text_model"]}
    assert info["layers"] == {"image": config["image_layer"], "text": config["text_layer"]}
    assert info["index"]["rows"] == N_PICS and info["index"]["captions"] is True
    assert info["limits"]["max_k"] == LIMITS.max_k and "protocol" not in info
    assert info["precision"] == "fp32"  # tests/conftest.py: auto means fp32 in the suite
    assert requests.get(f"{server}/openapi.json", timeout=30).json()["paths"]["/api/search"]


def test_a_run_without_metrics_has_no_protocol(tmp_path):
    assert run_protocol(tmp_path) == {}  # evaluated runs: tests/test_protocol.py


def test_concurrent_clients_get_the_sequential_answers(server):
    queries = [f"picture {i}" for i in range(8)]

    def ask(q: str) -> list[str]:
        response = requests.get(f"{server}/api/search", params={"q": q, "k": 4}, timeout=60)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["results"]]

    sequential = [ask(q) for q in queries]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, queries * 2)) == sequential * 2


def chunks(size: int):
    """The start of a multipart upload of field `image`, then `size` bytes of its file."""
    yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    for _ in range(size // 10_000):
        yield b"x" * 10_000


BAD = [  # (method, path, params / data, files, status, words in the message)
    ("get", "/api/search", {"q": "  "}, None, 400, "empty"),
    ("get", "/api/search", {}, None, 422, "q: Field required"),
    ("get", "/api/search", {"q": "a", "k": 1000}, None, 400, "between 1 and 8"),
    ("get", "/api/search", {"q": "a", "k": 0}, None, 400, "between 1 and 8"),
    ("get", "/api/search", {"q": "a", "k": "ten"}, None, 422, "k: "),
    ("get", "/api/search", {"q": "a" * 51}, None, 400, "at most 50"),
    ("post", "/api/search", {}, {"image": ("a.png", b"GIF89a\x00", "image/png")}, 400, "not an"),
    ("post", "/api/search", {}, {"image": ("a.png", b"", "image/png")}, 400, "is empty"),
    ("post", "/api/search", {}, {"image": ("a.txt", b"hello", "text/plain")}, 400, "not an"),
    ("post", "/api/search", {}, {"image": ("a.png", b"x" * 200_000, "image/png")}, 413, "cap"),
    ("post", "/api/search", {}, None, 422, "image: Field required"),
    ("post", "/api/embed", {}, None, 400, "either"),
    ("post", "/api/embed", {"texts": ["a", "b", "c", "d"]}, None, 400, "1 to 3 texts"),
    ("post", "/api/embed", {"texts": [""]}, None, 400, "empty"),
    ("post", "/api/classify", {"labels": "a,b,c,d,e"}, "p0", 400, "1 to 4 labels"),
    ("post", "/api/classify", {"labels": "cat,cat"}, "p0", 400, "cat"),
    ("post", "/api/classify", {"labels": " , "}, "p0", 400, "1 to 4 labels"),
    ("get", "/images/12", {}, None, 404, "no row 12"),
    ("get", "/images/-1", {}, None, 404, "no row -1"),
    ("get", "/images/..%2F..%2Fetc%2Fpasswd", {}, None, 404, "Not Found"),
    ("get", "/images/1.5", {}, None, 422, "row: "),
    ("get", "/nothing", {}, None, 404, "Not Found"),
]


@pytest.mark.parametrize("method, path, data, files, status, words", BAD)
def test_bad_input_is_one_json_message(server, pics, method, path, data, files, status, words):
    if files == "p0":
        files = {"image": ("p0.png", png(pics["pics"] / "p0.png"), "image/png")}
    if method == "get":
        response = requests.get(f"{server}{path}", params=data, timeout=30)
    else:
        response = requests.post(f"{server}{path}", data=data, files=files, timeout=30)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    assert words in detail, detail


def test_a_body_sent_in_chunks_is_stopped_at_the_cap(server):
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    response = requests.post(
        f"{server}/api/search", data=chunks(300_000), headers=headers, timeout=30
    )  # a generator: chunked transfer, no Content-Length to refuse up front
    assert response.status_code == 413 and "cap" in response.json()["detail"]


def test_only_recorded_regular_files_are_served(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 3), (10, 20, 30)).save(image)
    assert recorded_image(str(image), 10**6).size == (4, 3)
    (tmp_path / "link.png").symlink_to(image)
    (tmp_path / "dir").symlink_to(tmp_path)
    (tmp_path / "secret.txt").write_text("password")
    os.mkfifo(tmp_path / "fifo.png")
    cases = {
        str(tmp_path / "link.png"): "symbolic link",
        str(tmp_path / "dir" / "a.png"): "symbolic link",
        str(tmp_path / "secret.txt"): "no longer an image",
        str(tmp_path / "fifo.png"): "not a regular file",
        str(tmp_path / "gone.png"): "cannot be opened",
        "torchvision://CIFAR10/test/3": "no image file",
        "": "no image file",
        "sklearn://digits/99999": "not one of",
    }
    for path, words in cases.items():
        with pytest.raises(NoImage, match=words):
            recorded_image(path, 10**6)
    digit = np.asarray(recorded_image("sklearn://digits/7", 10**6))
    assert digit.shape == (8, 8, 3) and digit.max() > 200  # the digit 7, 0..16 scaled to 255


def test_a_recorded_file_swapped_for_a_symlink_is_not_served(server, pics, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (24, 24), (255, 0, 0)).save(outside)
    recorded = pics["pics"] / "p11.png"  # no other test asks for row 11's thumbnail
    kept = recorded.read_bytes()
    recorded.unlink()
    recorded.symlink_to(outside)
    try:
        response = requests.get(f"{server}/images/11", timeout=30)
        assert response.status_code == 404 and "symbolic link" in response.json()["detail"]
    finally:
        recorded.unlink()
        recorded.write_bytes(kept)


def test_without_an_index_search_is_off_and_the_rest_works(pics):
    with running(Service(pics["run"], None, "cpu", precision="bf16")) as url:
        assert requests.get(f"{url}/api/info", timeout=30).json()["precision"] == "bf16"
        response = requests.get(f"{url}/api/search", params={"q": "a"}, timeout=30)
        assert response.status_code == 404 and "without --index" in response.json()["detail"]
        assert requests.get(f"{url}/images/0", timeout=30).status_code == 404
        answer = requests.post(f"{url}/api/embed", data={"texts": ["a"]}, timeout=30)
        assert answer.status_code == 200 and requests.get(url, timeout=30).status_code == 200


def damaged_copy(pics, tmp_path: Path, name: str, file: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(pics[name], copy)
    (copy / file).write_bytes((copy / file).read_bytes()[:-10] + b"0123456789")
    return copy


def test_a_damaged_run_or_index_or_a_busy_port_refuses_to_start(pics, tmp_path, capsys):
    index = damaged_copy(pics, tmp_path, "index", "rows.parquet")
    run = damaged_copy(pics, tmp_path, "run", "head.safetensors")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            ([pics["run"], index, 0], "rows.parquet: changed since it was written"),
            ([run, pics["index"], 0], "head.safetensors"),
            ([pics["run"], pics["index"], port], f"cannot listen on 127.0.0.1:{port}"),
        ]
        for (r, i, p), words in cases:
            args = ["--params", "/dev/null", "serve", "--run", r, "--index", i, "--port", p]
            code, _, err = run_cli(args, capsys)
            assert code == 2 and words in one_line_error(err), err


def test_the_command_serves_warns_about_the_network_and_stops_on_ctrl_c(pics):
    command = [sys.executable, "-m", "pipeline", "--params", "/dev/null", "serve"]
    command += ["--run", str(pics["run"]), "--index", str(pics["index"])]
    command += ["--host", "0.0.0.0", "--port", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving run") and "12 images" in line, server.stderr.read()
        port = int(line.split("http://0.0.0.0:")[1].split("/")[0])
        info = requests.get(f"http://127.0.0.1:{port}/api/info", timeout=30).json()
        assert info["index"]["rows"] == N_PICS
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 130 and err.splitlines()[-1] == "stopped"
    assert exposure("0.0.0.0", port) in err and exposure("127.0.0.1", port) is None


def test_captions_are_left_out_rather_than_mismatched(pics, tmp_path):
    """A store whose manifest no longer matches the index gives no captions, not wrong ones."""
    from stages.serve.service import image_captions

    meta = json.loads((pics["index"] / "index.json").read_text())
    rows = pd.read_parquet(pics["index"] / "rows.parquet")
    assert list(image_captions(meta, rows)) == [f"picture {i}" for i in range(N_PICS)]
    assert image_captions(meta, rows.assign(id=rows["id"][::-1].to_numpy())) is None
    assert image_captions({**meta, "store": str(tmp_path / "none")}, rows) is None


def test_the_batcher_answers_each_caller_and_survives_a_failing_batch():
    from stages.serve.service import Batcher

    seen = []

    def double(items):
        seen.append(len(items))
        if any(x < 0 for (x,) in items):
            raise ValueError("negative")
        return [2 * x for (x,) in items]

    batcher = Batcher(double, max_batch=4)
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(batcher.submit, range(40))) == [2 * x for x in range(40)]
    assert max(seen) <= 4 and sum(seen) == 40
    with pytest.raises(ValueError, match="negative"):
        batcher.submit(-1)
    assert batcher.submit(5) == 10  # the worker lives on
    batcher.close()
    batcher.worker.join(timeout=10)
    assert not batcher.worker.is_alive()
