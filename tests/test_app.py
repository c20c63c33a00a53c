"""The web app through its JSON API (FastAPI TestClient): listings, counterfactual generation,
and a readable 4xx JSON error for every kind of bad input."""

import asyncio
import base64
import fnmatch
import io
import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from stmdit import (
    PanelExpressionEncoder,
    StainFeatureEncoder,
    STMDiT,
    STMDiTPipeline,
    make_sampling_scheduler,
)
from stmdit.data.chunks import ChunkedArray
from stmdit.data.synthetic import simulate_tissue
from stmdit.experiments.statistics import paired_change
from stmdit.genesets import load_gene_sets
from stmdit.web.api import MAX_CHANGES
from stmdit.web.app import create_app
from stmdit.web.guard import CONTENT_SECURITY_POLICY

BASE_URL = "http://127.0.0.1"
N_PANEL = 64


@pytest.fixture(scope="module")
def tissue():
    return simulate_tissue(n_sections=2, grid=6, tile_size=16, seed=0)


def write_pipeline(path, adata):
    """A tiny untrained pipeline with random weights (a zero-initialised DiT would ignore its
    condition, and a perturbation could then not change anything)."""
    ge = PanelExpressionEncoder.fit(adata, n_genes=N_PANEL)
    morph = StainFeatureEncoder(image_size=16)
    model = STMDiT.from_preset(
        "tiny", in_channels=3, sample_size=16, patch_size=4, morph_dim=morph.output_dim, ge_dim=N_PANEL
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    STMDiTPipeline(model, make_sampling_scheduler(pixel_space=True), ge, morph, None).save_pretrained(path)
    return path


def write_data_dir(root, tissue):
    """The simulator's sections as an .h5ad, and the same spots as a tiny prepared dataset with
    tiles (its first spot marked as background), beside a file that is no dataset."""
    tissue.adata.write_h5ad(root / "tissue.h5ad")
    store = root / "store"
    store.mkdir()
    spots = tissue.adata.copy()
    spots.obs["keep"] = True
    spots.obs.loc[spots.obs_names[0], "keep"] = False
    spots.write_h5ad(store / "spots.h5ad")
    # Written as prepare writes its tiles (chunks with done-markers), which a store's open checks.
    tiles = ChunkedArray(store / "tiles.zarr", tissue.tiles.shape, np.uint8, chunk_rows=16)
    for chunk in range(tiles.n_chunks):
        tiles.write(chunk, tissue.tiles[tiles.rows(chunk)])
    (store / "manifest.json").write_text(json.dumps({"prepare": {"tile_um": 64.0}, "stages": {"tiles": {}}}))
    (root / "notes.txt").write_text("not a dataset")
    return root


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tissue):
    return write_pipeline(tmp_path_factory.mktemp("pipeline") / "pipeline", tissue.adata)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tissue):
    return write_data_dir(tmp_path_factory.mktemp("data"), tissue)


@pytest.fixture(scope="module")
def client(pipeline_dir, data_dir):
    app = create_app(
        pipeline_dir,
        data_dir,
        gene_sets={"my set": ["MKI67", "TOP2A", "NOT_A_GENE"]},
        max_upload_mb=1,
        max_spots=100,
        steps=3,
    )
    with TestClient(app, base_url=BASE_URL) as test_client:
        yield test_client


@pytest.fixture
def own_client(pipeline_dir, data_dir):
    """A server of its own, for tests whose uploads must not show in the shared one's listing."""
    with TestClient(create_app(pipeline_dir, data_dir, max_upload_mb=1, steps=2), base_url=BASE_URL) as c:
        yield c


def request(tissue, **overrides):
    spot = tissue.adata.obs_names[1]
    body = {
        "dataset": "tissue.h5ad",
        "sample": "section0",
        "spot": spot,
        "changes": [],
        "n_seeds": 2,
        "seed": 0,
    }
    return {**body, **overrides}


def pixels(data_url: str) -> np.ndarray:
    head, _, data = data_url.partition(",")
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def assert_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message and "Traceback" not in message
    for word in words:
        assert word in message, message
    return message


def h5ad_bytes(adata: ad.AnnData, tmp_path) -> bytes:
    path = tmp_path / "upload.h5ad"
    adata.write_h5ad(path)
    return path.read_bytes()


def test_listings(client, tissue):
    assert client.get("/api/health").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text and 'href="/static/app.css"' in page.text
    for path in ("/", "/static/app.js", "/static/app.css"):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "http://" not in response.text and "https://" not in response.text  # nothing from elsewhere
        assert "style=" not in response.text  # inline styles would be blocked by the policy
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    assert client.get("/api/datasets").headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert_error(client.get("/static/../app.py"), 404)
    datasets = {d["name"]: d for d in client.get("/api/datasets").json()["datasets"]}
    assert set(datasets) == {"tissue.h5ad", "store"}
    assert datasets["store"]["tiles"] and not datasets["tissue.h5ad"]["tiles"]

    samples = client.get("/api/samples", params={"dataset": "tissue.h5ad"}).json()
    assert [s["name"] for s in samples["samples"]] == ["section0", "section1"] and samples["samples"][0][
        "n_spots"
    ] == 36
    spots = client.get("/api/spots", params={"dataset": "tissue.h5ad", "sample": "section0"}).json()["spots"]
    assert spots == list(tissue.adata.obs_names[:36])
    store_spots = client.get("/api/spots", params={"dataset": "store", "sample": "section0"}).json()["spots"]
    assert store_spots == spots[1:]

    genes = client.get("/api/genes", params={"dataset": "tissue.h5ad"}).json()
    assert genes["panel_size"] == genes["panel_found"] == N_PANEL and len(genes["genes"]) == N_PANEL
    sets = {
        s["name"]: s
        for s in client.get("/api/gene-sets", params={"dataset": "tissue.h5ad"}).json()["gene_sets"]
    }
    assert (
        "my set" in sets and "NOT_A_GENE" not in sets["my set"]["genes"] and sets["my set"]["n_defined"] == 3
    )
    markers = [s for s in sets.values() if s["origin"] == "marker programme"]
    assert markers and all(set(s["genes"]) <= set(genes["genes"]) for s in markers)
    config = client.get("/api/config").json()
    assert config["defaults"]["steps"] == 3 and config["upload"]["max_spots"] == 100


def test_pairs_share_their_noise(client, tissue):
    zero = client.post(
        "/api/generate", json=request(tissue, changes=[{"gene": "MKI67", "log2_fold_change": 0.0}])
    )
    assert zero.status_code == 200, zero.text
    result = zero.json()
    assert [p["seed"] for p in result["pairs"]] == [0, 1] and result["real_tile"] is None
    assert not result["morphology"]["used"] and "no tiles" in result["morphology"]["note"]
    for pair in result["pairs"]:
        control, perturbed = pixels(pair["control"]), pixels(pair["perturbed"])
        assert control.shape == (256, 256, 3)  # 16 px enlarged 16x with nearest neighbours
        assert (control[::16, ::16] == control[15::16, 15::16]).all()
        np.testing.assert_array_equal(control, perturbed)
    assert not np.array_equal(pixels(result["pairs"][0]["control"]), pixels(result["pairs"][1]["control"]))
    measured = {m["key"]: m for m in result["measurements"]}
    assert set(measured) == {"haematoxylin", "eosin", "brown", "nuclei"}
    # 16 px tiles are too small for a count of nuclei per area: the page says so instead.
    assert "too small" in measured.pop("nuclei")["note"]
    for m in measured.values():
        assert m["mean_change"] == 0 and len(m["control"]) == 2 and m["ci_low"] == m["ci_high"] == 0
        assert m["control_sd"] == pytest.approx(np.std(m["control"], ddof=1)) and m["p_value"] == 1.0
        assert not m["survives_holm"]
    assert result["replicates"]["description"] == "over 2 seeds: the model's change for this exact expression"
    assert result["multiplicity"]["method"] == "Holm" and result["multiplicity"]["n_tests"] == 3

    sets = client.get("/api/gene-sets", params={"dataset": "tissue.h5ad"}).json()["gene_sets"]
    changes = [{"gene_set": sets[0]["name"], "log2_fold_change": 5.0}, {"gene": "mki67", "knockout": True}]
    changed = client.post("/api/generate", json=request(tissue, changes=changes)).json()
    assert "knocked out" in changed["perturbation"] and sets[0]["name"] in changed["perturbation"]
    for before, after in zip(result["pairs"], changed["pairs"], strict=True):
        np.testing.assert_array_equal(
            pixels(before["control"]), pixels(after["control"])
        )  # same noise per seed
    assert any(not np.array_equal(pixels(p["control"]), pixels(p["perturbed"])) for p in changed["pairs"])
    # The t interval over the seeds' paired differences, as simulate gives it.
    for m in changed["measurements"]:
        if "note" not in m:
            expected = paired_change(m["perturbed"], m["control"])
            assert (m["ci_low"], m["ci_high"]) == pytest.approx((expected["ci_low"], expected["ci_high"]))


def test_sample_mean_and_real_morphology(client, tissue):
    mean = client.post("/api/generate", json=request(tissue, start="sample", spot=None, n_seeds=1)).json()
    assert mean["n_spots_averaged"] == 36 and len(mean["pairs"]) == 1
    # One seed: no interval and no test, and the page is told what to say instead.
    assert mean["replicates"]["no_interval"] == "no interval with one seed"
    assert mean["multiplicity"]["n_tests"] == 0
    for m in mean["measurements"]:
        assert "note" in m or (m["ci_low"] is None and m["p_value"] is None and m["control_sd"] is None)
    spot = tissue.adata.obs_names[3]
    with_tile = client.post(
        "/api/generate", json=request(tissue, dataset="store", spot=spot, use_morphology=True)
    ).json()
    assert with_tile["morphology"] == {"available": True, "used": True, "note": "used (the spot's real tile)"}
    np.testing.assert_array_equal(pixels(with_tile["real_tile"])[::16, ::16], tissue.tiles[3])
    response = client.post("/api/generate", json=request(tissue, use_morphology=True))
    assert_error(response, 400, "no tiles")
    response = client.post(
        "/api/generate", json=request(tissue, dataset="store", start="sample", use_morphology=True)
    )
    assert_error(response, 400, "spot")


def not_in_panel(client, tissue):
    panel = set(client.get("/api/genes", params={"dataset": "tissue.h5ad"}).json()["genes"])
    return next(g for g in tissue.adata.var_names if g not in panel)


@pytest.mark.parametrize(
    ("overrides", "status", "words"),
    [
        ({"guidance_ge": 11.0}, 422, ["guidance_ge", "10"]),
        ({"guidance_morph": -1}, 422, ["guidance_morph"]),
        ({"guidance_ge": "high"}, 422, ["guidance_ge"]),
        ({"n_seeds": 5}, 422, ["n_seeds"]),
        ({"seed": 1.5}, 422, ["seed"]),
        ({"steps": 0}, 422, ["steps"]),
        ({"start": "cluster"}, 422, ["start"]),
        ({"colour": "blue"}, 422, ["colour"]),
        ({"changes": [{"gene": "MKI67", "log2_fold_change": 6}]}, 422, ["log2_fold_change"]),
        ({"changes": [{"gene": "MKI67", "gene_set": "my set"}]}, 422, ["gene"]),
        ({"changes": [{"gene": "MKI67", "log2_fold_change": 1}] * (MAX_CHANGES + 1)}, 422, ["changes"]),
        (
            {"changes": [{"gene": "NOTAGENE"}, {"gene": "ALSO_NOT", "knockout": True}]},
            400,
            ["NOTAGENE", "ALSO_NOT"],
        ),
        ({"changes": [{"gene_set": "no such set", "log2_fold_change": 1}]}, 400, ["no such set"]),
        ({"spot": "section9_0x0"}, 404, ["section9_0x0"]),
        ({"spot": "section1_0x0"}, 404, ["section1_0x0"]),  # a real spot, but of the other sample
        ({"sample": "section7"}, 404, ["section7"]),
        ({"dataset": "../../etc/passwd"}, 404, ["../../etc/passwd"]),
        ({"dataset": "/etc/passwd"}, 404, ["unknown dataset"]),
        ({"dataset": "notes.txt"}, 404, ["unknown dataset"]),
        ({"dataset": "store/spots.h5ad"}, 404, ["unknown dataset"]),
    ],
)
def test_bad_generate_requests_get_readable_errors(client, tissue, overrides, status, words):
    assert_error(client.post("/api/generate", json=request(tissue, **overrides)), status, *words)


def test_more_bad_requests(client, tissue):
    gene = not_in_panel(client, tissue)
    response = client.post(
        "/api/generate", json=request(tissue, changes=[{"gene": gene, "log2_fold_change": 1}])
    )
    assert_error(response, 400, gene, "panel")
    assert_error(
        client.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "JSON",
    )
    assert_error(
        client.post("/api/generate", content=b"x" * 100_000, headers={"content-type": "application/json"}),
        413,
    )
    for name in ("../../etc/passwd", "..", "tissue.h5ad/..", "%2e%2e%2fetc"):
        assert_error(client.get("/api/samples", params={"dataset": name}), 404, "unknown dataset")
        assert_error(client.get("/api/genes", params={"dataset": name}), 404, "unknown dataset")
    assert_error(
        client.get("/api/spots", params={"dataset": "tissue.h5ad", "sample": "../x"}), 404, "unknown sample"
    )
    assert_error(client.get("/api/samples"), 422, "dataset")
    assert_error(client.get("/api/no-such-endpoint"), 404)
    # DNS rebinding and cross-site posts: only this server's own name is served.
    assert_error(client.get("/api/datasets", headers={"host": "evil.example"}), 403, "localhost")
    response = client.post("/api/generate", json=request(tissue), headers={"origin": "https://evil.example"})
    assert_error(response, 403, "other web sites")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.0.0.1:9999", False),  # another port of the same machine is another site
        ("http://127.0.0.1", False),  # port 80
        ("https://127.0.0.1:8000", False),
        ("http://localhost:8000", False),  # another name: another origin, as browsers see it
        ("http://evil.example:8000", False),
        ("null", False),
        ("http://127.0.0.1:notaport", False),
    ],
)
def test_origin_must_match_scheme_host_and_port(pipeline_dir, data_dir, tissue, origin, allowed):
    app = create_app(pipeline_dir, data_dir, steps=2)
    with TestClient(app, base_url="http://127.0.0.1:8000") as server_on_8000:
        response = server_on_8000.post(
            "/api/generate", json=request(tissue, n_seeds=1), headers={"origin": origin}
        )
        if allowed:
            assert response.status_code == 200, response.text
        else:
            assert_error(response, 403, "other web sites")
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        # Without an Origin header (same-origin GETs), the Host alone decides.
        assert server_on_8000.get("/api/datasets").status_code == 200


def test_upload_that_decompresses_beyond_the_limit_is_refused(own_client, tissue, tmp_path):
    """A small file whose uns holds a gzip-compressed array of zeros: 1 MB uploads may take at
    most 10 MB once decompressed, and this one would take 64 MB."""
    bomb = tmp_path / "bomb.h5ad"
    tissue.adata[:20].copy().write_h5ad(bomb)
    with h5py.File(bomb, "a") as f:
        f["uns"].create_dataset(
            "zeros", shape=(2**23,), dtype="float64", compression="gzip", compression_opts=9, fillvalue=0
        )
        f["uns/zeros"][:] = 0.0
    assert bomb.stat().st_size < 2**20  # passes the byte limit of the upload itself
    response = own_client.post("/api/upload", files={"file": ("bomb.h5ad", bomb.read_bytes())})
    assert_error(response, 413, "64 MB once decompressed", "10 MB")
    assert {d["name"] for d in own_client.get("/api/datasets").json()["datasets"]} == {"tissue.h5ad", "store"}


def test_uploads_load_only_obs_var_and_counts(own_client, tissue, tmp_path):
    adata = tissue.adata[:20].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.zeros(adata.shape, np.float32) - 1  # would be "negative" if X were read
    path = tmp_path / "layers.h5ad"
    adata.write_h5ad(path)
    with h5py.File(path, "a") as f:  # an element anndata cannot read: the app never reads uns
        f["uns"].create_group("unreadable").attrs["encoding-type"] = "no-such-encoding"
    response = own_client.post("/api/upload", files={"file": ("layers.h5ad", path.read_bytes())})
    assert response.status_code == 200, response.text
    with pytest.raises(Exception, match="no-such-encoding"):
        ad.read_h5ad(path)


@pytest.mark.parametrize(
    ("keep", "kept"),
    [
        ([True, False] * 10, 10),
        ([1, 0] * 10, 10),
        ([1.0, 0.0] * 10, 10),
        (pd.Categorical([True, False] * 10), 10),
        (["yes", "no"] * 10, None),
        ([1, 2] * 10, None),
        ([1.0, np.nan] * 10, None),
    ],
)
def test_keep_column_must_be_booleans_or_0_1(own_client, tissue, tmp_path, keep, kept):
    adata = tissue.adata[:20].copy()
    adata.obs["keep"] = keep
    response = own_client.post("/api/upload", files={"file": ("keep.h5ad", h5ad_bytes(adata, tmp_path))})
    if kept is None:
        assert_error(response, 400, "obs['keep']", "booleans", "0/1")
    else:
        assert response.status_code == 200, response.text
        assert response.json()["n_spots"] == kept


def test_unexpected_errors_are_short_and_logged(client, tissue, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("stmdit.web.api.paired_generate", broken)
    message = assert_error(client.post("/api/generate", json=request(tissue)), 500, "server's log")
    assert "secret" not in message
    assert "secret internals" in caplog.text


def test_uploads(client, tissue, tmp_path):
    def upload(content: bytes, filename="data.h5ad"):
        return client.post("/api/upload", files={"file": (filename, content, "application/octet-stream")})

    small = tissue.adata[:40].copy()
    assert_error(upload(b"\0" * (2**20 + 10)), 413, "1 MB")
    assert_error(upload(b"gene,count\nMKI67,3\n", "counts.csv"), 400, "not an .h5ad")
    no_counts = ad.AnnData(obs=small.obs[["sample_id"]], var=small.var)
    assert_error(upload(h5ad_bytes(no_counts, tmp_path)), 400, "no counts")
    scaled = ad.AnnData(
        np.asarray(small.X, dtype=np.float32) - 5, obs=small.obs[["sample_id"]], var=small.var
    )
    assert_error(upload(h5ad_bytes(scaled, tmp_path)), 400, "negative")
    renamed = small.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    assert_error(upload(h5ad_bytes(renamed, tmp_path)), 400, "shares only 0", "panel genes")
    crowded = ad.concat([tissue.adata, tissue.adata], index_unique="-")[:101].copy()
    assert_error(upload(h5ad_bytes(crowded, tmp_path)), 413, "101 spots", "100")
    linked = tmp_path / "linked.h5ad"
    small.write_h5ad(linked)
    with h5py.File(linked, "a") as f:
        f["uns/elsewhere"] = h5py.ExternalLink("/etc/secret.h5", "/data")
    assert_error(upload(linked.read_bytes()), 400, "other files")
    assert_error(client.post("/api/upload", data={"file": "text"}), 400, "'file'")
    assert {d["name"] for d in client.get("/api/datasets").json()["datasets"]} == {"tissue.h5ad", "store"}

    plain = small.copy()
    del plain.obs["sample_id"]
    plain.obs_names = [f"my spot {i}" for i in range(plain.n_obs)]
    response = upload(h5ad_bytes(plain, tmp_path), "../../my section.h5ad")
    assert response.status_code == 200, response.text
    name = response.json()["dataset"]
    assert name.endswith("my_section") and response.json()["n_spots"] == 40
    assert name in {d["name"] for d in client.get("/api/datasets").json()["datasets"]}
    assert client.get("/api/samples", params={"dataset": name}).json()["samples"] == [
        {"name": "all spots", "n_spots": 40}
    ]
    body = request(
        tissue,
        dataset=name,
        sample="all spots",
        spot="my spot 7",
        n_seeds=1,
        changes=[{"gene": "MKI67", "log2_fold_change": 2.0}],
    )
    assert client.post("/api/generate", json=body).status_code == 200


def test_uploads_stay_out_of_the_data_folder(pipeline_dir, data_dir, tissue, tmp_path):
    before = sorted(p.name for p in data_dir.iterdir())
    app = create_app(pipeline_dir, data_dir, max_uploads=1, steps=2)
    with TestClient(app, base_url=BASE_URL) as test_client:
        for i in range(2):
            data = h5ad_bytes(tissue.adata[:30].copy(), tmp_path)
            response = test_client.post("/api/upload", files={"file": (f"s{i}.h5ad", data)})
            assert response.status_code == 200, response.text
        names = [d["name"] for d in test_client.get("/api/datasets").json()["datasets"]]
        assert names == ["store", "tissue.h5ad", "upload 2: s1"]  # the oldest upload made room
    assert sorted(p.name for p in data_dir.iterdir()) == before


def chunked(*parts: bytes):
    """A body as a generator: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""
    yield from parts


def multipart_file(content: bytes, boundary: str = "stmdit-test-boundary") -> tuple[bytes, ...]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="data.h5ad"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode(), content, f"\r\n--{boundary}--\r\n".encode()


def test_chunked_bodies_keep_their_size_limits(own_client, tissue, tmp_path):
    """Without a Content-Length the guard counts the body as it arrives: an oversize chunked
    body gets the same 413 as one that declares its length (not FastAPI's 400 for a body it
    failed to read), and a chunked body within the limit is served."""
    form = {"content-type": "multipart/form-data; boundary=stmdit-test-boundary"}
    response = own_client.post(
        "/api/upload", content=chunked(*multipart_file(b"\0" * (2**20 + 10))), headers=form
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "1 MB limit")
    json_type = {"content-type": "application/json"}
    assert_error(
        own_client.post("/api/generate", content=chunked(b" " * 100_000), headers=json_type), 413, "too large"
    )

    data = h5ad_bytes(tissue.adata[:30].copy(), tmp_path)
    response = own_client.post("/api/upload", content=chunked(*multipart_file(data)), headers=form)
    assert response.status_code == 200, response.text
    body = json.dumps(request(tissue, n_seeds=1)).encode()
    response = own_client.post("/api/generate", content=chunked(body[:10], body[10:]), headers=json_type)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "content_type", "limit", "words"),
    [
        ("/api/upload", "multipart/form-data; boundary=stmdit-test-boundary", 2**20 + 2**16, "1 MB limit"),
        ("/api/generate", "application/json", 2**16, "too large"),
    ],
)
def test_endless_body_is_refused_after_its_limit(client, path, content_type, limit, words):
    """An endless chunked body, message by message as a server passes it on (the test client
    hands the app the whole body as one message): refused with a 413 once past the limit (the
    file's 1 MB and room for the form's framing), having read at most one message beyond it."""
    head = multipart_file(b"")[0] if path == "/api/upload" else b""
    chunk = b" " * 2**16
    read = 0

    async def receive():
        nonlocal read
        body = head if read == 0 and head else chunk
        read += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(client.app(scope, receive, send))
    assert limit < read <= limit + len(chunk)
    assert [(m["type"], m.get("status")) for m in sent] == [
        ("http.response.start", 413),
        ("http.response.body", None),
    ]
    assert words in json.loads(sent[1]["body"])["error"]


def test_unusable_data_folder_dataset_is_reported(pipeline_dir, tmp_path, tissue):
    bad = tissue.adata[:20].copy()
    bad.var_names = [f"gene{i}" for i in range(bad.n_vars)]
    bad.write_h5ad(tmp_path / "foreign.h5ad")
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "table.h5ad")  # named .h5ad, but is not one
    with TestClient(create_app(pipeline_dir, tmp_path, steps=2), base_url=BASE_URL) as test_client:
        assert_error(test_client.get("/api/samples", params={"dataset": "foreign.h5ad"}), 400, "panel genes")
        assert_error(test_client.get("/api/samples", params={"dataset": "table.h5ad"}), 400, "cannot be read")


def test_gene_sets_file(tmp_path):
    path = tmp_path / "sets.yaml"
    path.write_text("proliferation: [MKI67, TOP2A]\nimmune: [CD3E]\n")
    assert load_gene_sets(path) == {"proliferation": ["MKI67", "TOP2A"], "immune": ["CD3E"]}
    path.write_text("proliferation: MKI67\n")
    with pytest.raises(ValueError, match="lists of gene symbols"):
        load_gene_sets(path)


def test_misconfigured_server_says_what_is_wrong(pipeline_dir, data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        create_app(tmp_path, data_dir)
    with pytest.raises(FileNotFoundError, match="data folder"):
        create_app(pipeline_dir, tmp_path / "missing")


def test_page_and_templates_are_package_data():
    """The static page and the report templates are read at run time, so the wheel must carry
    them: every such file matches a package-data pattern of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = root / "src" / "stmdit"
    files = [*(package / "web" / "static").iterdir(), *(package / "experiments" / "templates").iterdir()]
    assert {f.name for f in files} >= {"index.html", "app.js", "app.css", "simulate_report.html.j2"}
    for f in files:
        relative = f.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns["stmdit"]), relative


def test_a_body_passing_the_limit_after_the_answer_began_cuts_it_short_and_says_so(caplog):
    """An app that starts answering before it has read the whole body: the guard cannot answer
    413 any more; it stops the read, lets the begun answer stand, and logs that it was cut short."""
    from stmdit.web.guard import MAX_JSON_BYTES, Guard

    async def streaming_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:  # reads until the guard stops it
            await receive()

    async def receive():
        return {"type": "http.request", "body": b" " * 2**16, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "scheme": "http", "path": "/api/generate",
             "headers": [(b"host", b"127.0.0.1")]}  # fmt: skip
    guard = Guard(streaming_app, {"127.0.0.1"}, max_upload_bytes=2**20)
    with caplog.at_level("WARNING", logger="stmdit.web.guard"):
        asyncio.run(guard(scope, receive, send))
    assert [(m["type"], m.get("status")) for m in sent] == [("http.response.start", 200)]
    assert f"passed the {MAX_JSON_BYTES}-byte limit after the answer had begun" in caplog.text
