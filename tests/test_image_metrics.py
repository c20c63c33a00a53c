import hashlib
import json

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from stmdit.encoders.morphology import StainFeatureEncoder
from stmdit.evaluate import image_metrics
from stmdit.evaluate.image_metrics import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    MorphologyFeatures,
    compute_image_metrics,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    kid,
    uni2h_features,
)
from stmdit.hub import WeightsUnavailableError
from stmdit.io import UntrustedPickleError

torch_fidelity = pytest.importorskip("torch_fidelity")


class PickledNote:
    """Stands for any Python object in a weights file, which only full unpickling restores."""


# --- Fréchet distance ------------------------------------------------------------------------


def test_gaussian_stats_match_numpy():
    x = np.random.default_rng(0).normal(size=(50, 7))
    mu, sigma = gaussian_stats(torch.from_numpy(x).float())
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(x[:1])


def test_frechet_distance_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # Covariances sharing eigenvectors commute; the distance is invariant to the common rotation.
    q = ortho_group.rvs(d, random_state=2)
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_is_zero_for_identical_gaussians_and_symmetric():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 12))
    b = rng.normal(size=(150, 12)) @ rng.normal(size=(12, 12)) + 1
    mu_a, s_a = gaussian_stats(a)
    mu_b, s_b = gaussian_stats(b)
    assert frechet_distance(mu_a, s_a, mu_a, s_a) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(
        frechet_distance(mu_b, s_b, mu_a, s_a), rel=1e-9
    )
    tf = torch_fidelity.metric_fid.fid_statistics_to_metric(
        {"mu": mu_a, "sigma": s_a}, {"mu": mu_b, "sigma": s_b}, verbose=False
    )
    assert frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(tf["frechet_inception_distance"], rel=1e-8)


def test_frechet_distance_refuses_broken_statistics_and_retries_singular_products(monkeypatch):
    with pytest.raises(ValueError, match="imaginary components"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    calls = []
    real_sqrtm = image_metrics.scipy.linalg.sqrtm

    def first_root_fails(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(image_metrics.scipy.linalg, "sqrtm", first_root_fails)
    # The retry adds eps to both diagonals, which biases the distance by about -2 d eps.
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), eps=1e-6) == pytest.approx(-4e-6)
    np.testing.assert_allclose(calls[1], (1 + 1e-6) ** 2 * np.eye(2))


def test_frechet_from_few_features_equals_the_full_computation():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(10, 64))
    b = rng.normal(size=(12, 64)) * 1.5 + 0.3
    full = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert frechet_distance_from_features(a, b) == pytest.approx(full, rel=1e-6)
    assert frechet_distance_from_features(a, a) == pytest.approx(0, abs=1e-9)
    many_a, many_b = rng.normal(size=(80, 8)), rng.normal(size=(90, 8)) + 1
    assert frechet_distance_from_features(many_a, many_b) == pytest.approx(
        frechet_distance(*gaussian_stats(many_a), *gaussian_stats(many_b))
    )


# --- KID -------------------------------------------------------------------------------------


def unbiased_mmd2_by_hand(x, y, degree=3, coef0=1.0):
    """The unbiased estimator written out pair by pair (Binkowski et al. 2018, eq. 3)."""
    m, d = len(x), x.shape[1]

    def k(u, v):
        return (u @ v / d + coef0) ** degree

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_hand_computed_unbiased_estimator():
    x = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 0.5]])
    y = np.array([[1.0, 1.0], [3.0, 0.0], [0.5, 2.5]])
    # One subset holding every sample is a permutation of the set, and the estimator ignores order.
    mean, std = kid(x, y, subsets=1, subset_size=3)
    assert mean == pytest.approx(unbiased_mmd2_by_hand(x, y), rel=1e-12) and std == 0


def test_kid_is_about_zero_for_identical_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    # The same samples on both sides leave only the estimator's O(1/m) self-pairing term.
    same, _ = kid(a, a, subsets=1, subset_size=400)
    k = (a @ a.T / 32 + 1) ** 3
    assert same == pytest.approx(-2 * (np.trace(k) - k.sum() / 400) / (400 * 399))
    independent, independent_std = kid(a, b, subsets=10, subset_size=200)
    small, _ = kid(a, a + 0.5, subsets=10, subset_size=200)
    large, _ = kid(a, a + 2.0, subsets=10, subset_size=200)
    assert abs(same) < 0.05 * small and abs(independent) < 2 * independent_std
    assert 0 < small < large


@pytest.mark.parametrize(
    ("n_a", "n_b", "subset_size"), [(50, 40, 20), (50, 40, 40), (60, 60, 60), (30, 30, 2)]
)
def test_kid_is_torch_fidelitys_kid_on_the_same_features(n_a, n_b, subset_size):
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(n_a, 16)), rng.normal(size=(n_b, 16)) + 0.2
    ours = kid(a, b, subsets=100, subset_size=subset_size, seed=3)
    theirs = torch_fidelity.metric_kid.kid_features_to_metric(
        torch.from_numpy(a),
        torch.from_numpy(b),
        kid_subsets=100,
        kid_subset_size=subset_size,
        rng_seed=3,
        kid_degree=3,
        kid_gamma=None,
        kid_coef0=1,
        verbose=False,
    )
    # Same draws and the same order of summation: equal down to the rounding. Where every
    # subset is the whole of both sets, the std is that rounding alone, and still torch-fidelity's.
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-12)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)
    if n_a == n_b == subset_size:
        assert 0 < ours[1] < 1e-12 * abs(ours[0])


def test_kid_refuses_subsets_it_cannot_draw():
    a, b = np.zeros((50, 8)), np.zeros((40, 8))
    with pytest.raises(ValueError, match="subset_size"):
        kid(a, b, subset_size=41)
    with pytest.raises(ValueError, match="subsets"):
        kid(a, b, subsets=0, subset_size=10)


def test_kid_from_fewer_images_than_the_subset_size_shrinks_its_subsets_with_a_caveat():
    generator = torch.Generator().manual_seed(7)
    real, fake = torch.rand(30, 3, 8, 8, generator=generator), torch.rand(24, 3, 8, 8, generator=generator)

    def pixels(images):  # KID reads the "inception" entry; any features serve its protocol here
        return images.flatten(1)

    result = compute_image_metrics(real, fake, {"inception": pixels}, reference="random", seed=5)
    entry = result["overall"]["kid"]
    assert entry["protocol"]["kid_subsets"] == 100 and entry["protocol"]["kid_subset_size"] == 24
    assert entry["protocol"]["kid_subset_size_requested"] == 1000
    caveat = next(c for c in result["caveats"] if c["kind"] == "small_kid_subsets" and c["group"] is None)
    assert caveat["text"].startswith("KID from few images: subsets of 24 images instead of 1000")
    assert "each the whole of the smaller set" in caveat["text"]
    assert any(w.startswith("overall kid: KID from few images") for w in result["warnings"])


# --- Inception features without the real weights -----------------------------------------------


@pytest.fixture(scope="module")
def inception(random_inception_weights):
    return InceptionFeatures(weights=random_inception_weights)


@pytest.fixture(scope="module")
def tiles():
    """Four small tiles and the same tiles with their colour channels rotated (a 'fake' set)."""
    real = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [0.9, 0.5, 0.8]
    ).view(1, 3, 1, 1)
    return real, real[:, [2, 0, 1]]


def test_inception_features_load_from_a_local_file_and_are_deterministic(
    inception, random_inception_weights, tiles
):
    real, fake = tiles
    features = inception(real)
    assert features.shape == (4, 2048) and features.dtype == torch.float32
    torch.testing.assert_close(inception(real), features, rtol=0, atol=0)
    # uint8 input quantises to the same values as float input.
    torch.testing.assert_close(inception((real * 255).round().to(torch.uint8)), features, rtol=0, atol=0)
    assert frechet_distance_from_features(features, features) == pytest.approx(0, abs=1e-9)
    assert frechet_distance_from_features(features, inception(fake)) > 1e-3
    protocol = inception.protocol
    assert protocol["weights_sha256"] == hashlib.sha256(random_inception_weights.read_bytes()).hexdigest()
    assert protocol["weights_standard"] is False and "299 x 299" in protocol["preprocessing"]
    inception.train()
    assert not inception.model.training  # batch norm must keep its running statistics


def test_inception_weights_from_the_environment_variable(
    monkeypatch, random_inception_weights, inception, tiles
):
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(random_inception_weights))
    from_env = InceptionFeatures()
    assert from_env.weights_path == random_inception_weights.resolve()
    torch.testing.assert_close(from_env(tiles[0][:1]), inception(tiles[0][:1]))


def test_missing_inception_weights_say_which_file_and_how_to_point_at_it(monkeypatch, tmp_path):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError) as err:
        InceptionFeatures(download=False)
    message = str(err.value)
    for needed in (
        INCEPTION_WEIGHTS_FILE,
        INCEPTION_WEIGHTS_ENV,
        "https://github.com/toshas/torch-fidelity",
        "6726825d",
    ):
        assert needed in message

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(WeightsUnavailableError, match="downloading it failed.*network unreachable"):
        InceptionFeatures()
    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_WEIGHTS_FILE}.*{INCEPTION_WEIGHTS_ENV}"):
        InceptionFeatures(weights=tmp_path / "nowhere.pth")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_WEIGHTS_ENV} names .*nowhere.pth"):
        InceptionFeatures()


def test_inception_weights_found_in_the_torch_hub_cache(monkeypatch, tmp_path, random_inception_weights):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.symlink_to(random_inception_weights)
    assert image_metrics.resolve_inception_weights(download=False) == cached


def test_files_that_are_not_inception_weights_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a state dict of the FID Inception-v3"):
        InceptionFeatures(weights=tmp_path / "other.pth")
    torch.save({"note": PickledNote()}, tmp_path / "pickled.pth")
    with pytest.raises(UntrustedPickleError):
        InceptionFeatures(weights=tmp_path / "pickled.pth")


# --- All metrics with their protocol -----------------------------------------------------------


def test_every_number_carries_its_protocol_and_few_images_are_flagged(inception, tiles):
    real, fake = tiles
    stain = MorphologyFeatures(StainFeatureEncoder(), "stain")
    result = compute_image_metrics(
        real,
        fake,
        {"inception": inception, "stain": stain},
        kid_subsets=3,
        per_group=["s1", "s1", "s2", "s2"],
        reference="4 random test tiles",
    )
    json.dumps(result)  # the whole record serialises for reports
    assert set(result["overall"]) == {"fid", "kid", "fd_stain"}
    fid = result["overall"]["fid"]
    assert fid["value"] > 0 and result["overall"]["kid"]["mean"] is not None
    for scope in (result["overall"], *result["per_group"].values()):
        for entry in scope.values():
            protocol = entry["protocol"]
            for key in ("n_real", "n_generated", "real_image_sizes", "reference", "feature_extractor"):
                assert key in protocol
            assert protocol["reference"] == "4 random test tiles" and protocol["real_image_sizes"] == [
                [32, 32]
            ]
    assert fid["protocol"]["feature_extractor"]["weights_sha256"] == inception.weights_sha256
    assert "299 x 299" in fid["protocol"]["feature_extractor"]["preprocessing"]
    assert result["per_group"]["s1"]["fid"]["protocol"]["n_real"] == 2
    warnings = "\n".join(result["warnings"])
    assert "overall fid: FID from 4 real and 4 generated images in a 2048-d feature space" in warnings
    assert "rank-deficient" in warnings and "not the standard FID file" in warnings
    assert "KID from few images: subsets of 4 images instead of 1000" in warnings
    assert "each the whole of both sets, so its std is rounding only" in warnings
    assert len(result["overall"]["fd_stain"]["protocol"]["feature_extractor"]["state_dict_sha256"]) == 64
    assert any("rank-deficient" in w for w in fid["warnings"])


def test_metric_without_enough_images_is_withheld_with_a_reason():
    rng = torch.Generator().manual_seed(2)
    real, fake = torch.rand(3, 3, 16, 16, generator=rng), torch.rand(3, 3, 16, 16, generator=rng)

    def mean_colour(images):  # a bare callable: nothing records what it is
        return images.mean(dim=(2, 3))

    result = compute_image_metrics(
        real, fake, {"rgb": mean_colour}, per_group=(["a", "a", "b"], ["b", "a", "a"])
    )
    assert result["per_group"]["a"]["fd_rgb"]["value"] is not None
    assert result["per_group"]["b"]["fd_rgb"]["value"] is None
    warnings = result["warnings"]
    assert "group 'b' fd_rgb: FD-RGB needs at least 2 real and 2 generated images" in warnings
    assert any("no reference-set description" in w for w in warnings)
    assert any("rgb extractor does not record its weights" in w for w in warnings)
    # The same notes as records, each with its kind and scope, for one report line per kind.
    kinds = {(c["metric"], c["kind"], c["group"]) for c in result["caveats"]}
    assert kinds == {(None, "no_reference", None), ("rgb", "extractor", None),
                     ("fd_rgb", "too_few_images", "b"), ("fd_rgb", "rank_deficient", None),
                     ("fd_rgb", "rank_deficient", "a")}  # fmt: skip
    assert {c["text"] for c in result["caveats"] if c["kind"] != "no_reference"} <= {
        w.split(": ", 1)[-1] if w.startswith(("group", "overall")) else w for w in warnings
    }
    with pytest.raises(ValueError, match="paired"):
        compute_image_metrics(real, fake[:2], {"rgb": mean_colour}, per_group=["a", "a", "b"])


def test_fd_uni_records_the_encoder_weights(monkeypatch, tmp_path):
    import timm

    from stmdit.encoders.morphology import UNI2H_KWARGS, UNI2H_MODEL, _resolve_layers

    narrow = {"embed_dim": 48, "depth": 2, "num_heads": 4}
    model = timm.create_model(UNI2H_MODEL, pretrained=False, **_resolve_layers({**UNI2H_KWARGS, **narrow}))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setenv("STMDIT_UNI2H", str(tmp_path))
    uni = uni2h_features(**narrow)
    assert (
        uni.protocol["weights_sha256"]
        == hashlib.sha256((tmp_path / "pytorch_model.bin").read_bytes()).hexdigest()
    )
    assert (
        uni.protocol["encoder_config"]["image_size"] == 224 and "224 x 224" in uni.protocol["preprocessing"]
    )
    rng = torch.Generator().manual_seed(3)
    real, fake = torch.rand(3, 3, 64, 64, generator=rng), torch.rand(3, 3, 64, 64, generator=rng)
    result = compute_image_metrics(real, fake, {"uni": uni}, reference="random")
    entry = result["overall"]["fd_uni"]
    assert entry["value"] > 0 and entry["protocol"]["feature_extractor"]["extractor"] == "UNI-2h"
    assert not any("does not record a weights file" in w for w in result["warnings"])
