"""The latent priors besides the per-class Gaussian: the true-slot prior, the per-class Gaussian
mixture and its EM, the batch prior of the generation path, and the prior's name in eval.json."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import TINY_RECIPE, invoke, write_toml

from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.evaluation.evaluator import fit_prior
from capsgan_toolkit.evaluation.prior import (
    ClassGaussianPrior,
    ClassMixturePrior,
    TrueSlotPrior,
    batch_prior_latents,
    encode_training_split,
    fit_gaussian_mixture,
    fit_latent_prior,
    prior_from_state_dict,
)
from capsgan_toolkit.recipe.build import build
from capsgan_toolkit.recipe.schema import resolve

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

# ------------------------------------------------------------------ EM on a hand-made case


def _two_clusters() -> tuple[np.ndarray, np.ndarray]:
    """300 points around (-6, 0) and 700 around (6, 3): far apart, so the EM optimum is each cluster's own fit."""
    rng = np.random.default_rng(0)
    a = rng.multivariate_normal([-6.0, 0.0], [[1.0, 0.0], [0.0, 0.25]], size=300)
    b = rng.multivariate_normal([6.0, 3.0], [[0.5, 0.2], [0.2, 0.8]], size=700)
    return a, b


def test_em_recovers_a_hand_made_two_cluster_mixture():
    a, b = _two_clusters()
    x = torch.from_numpy(np.concatenate([b[:350], a, b[350:]]))  # clusters interleaved in the input
    fit = fit_gaussian_mixture(x, 2, generator=torch.Generator().manual_seed(0), shrinkage=0.0)
    order = torch.argsort(fit["means"][:, 0])  # component of cluster a first
    weights, means, covs = fit["weights"][order], fit["means"][order], fit["covariances"][order]
    # Maximum likelihood per cluster: the proportion, the mean and the biased covariance of its points.
    np.testing.assert_allclose(weights.numpy(), [0.3, 0.7], atol=1e-9)
    np.testing.assert_allclose(means.numpy(), [a.mean(0), b.mean(0)], atol=1e-9)
    np.testing.assert_allclose(covs[0].numpy(), np.cov(a, rowvar=False, bias=True) + 1e-8 * np.eye(2), atol=1e-9)
    np.testing.assert_allclose(covs[1].numpy(), np.cov(b, rowvar=False, bias=True) + 1e-8 * np.eye(2), atol=1e-9)
    # Its log-likelihood, computed independently with scipy.
    density = (0.3 * scipy.stats.multivariate_normal(means[0].numpy(), covs[0].numpy()).pdf(x.numpy())
               + 0.7 * scipy.stats.multivariate_normal(means[1].numpy(), covs[1].numpy()).pdf(x.numpy()))
    assert fit["log_likelihood"][-1] == pytest.approx(float(np.log(density).mean()), rel=1e-9)


def _numpy_em_step(x, weights, means, covs):
    """One EM step in plain numpy/scipy (an independent re-implementation)."""
    dens = np.stack([w * scipy.stats.multivariate_normal(m, c).pdf(x) for w, m, c in zip(weights, means, covs)], 1)
    resp = dens / dens.sum(1, keepdims=True)
    mass = resp.sum(0)
    new_means = resp.T @ x / mass[:, None]
    new_covs = np.stack([(resp[:, j, None] * (x - new_means[j])).T @ (x - new_means[j]) / mass[j]
                         for j in range(len(weights))])
    return mass / len(x), new_means, new_covs


def test_em_on_overlapping_clusters_climbs_and_stops_at_a_fixed_point_of_em():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal([0, 0, 0], 1.0, size=(150, 3)), rng.normal([1.5, 1.0, -0.5], 0.7, size=(250, 3)),
                        rng.normal([-1.0, 2.0, 1.0], 0.5, size=(100, 3))])
    fit = fit_gaussian_mixture(torch.from_numpy(x), 3, generator=torch.Generator().manual_seed(5), shrinkage=0.0,
                               iterations=500, tol=1e-10)
    history = fit["log_likelihood"]
    assert len(history) > 3 and all(b >= a - 1e-12 for a, b in zip(history, history[1:])), history
    w, m, c = (fit[k].numpy() for k in ("weights", "means", "covariances"))
    w2, m2, c2 = _numpy_em_step(x, w, m, c - 1e-8 * np.eye(3))
    # EM converges linearly: at the stopping rule one more step moves the parameters by < 1e-4
    np.testing.assert_allclose(w2, w, atol=1e-4)
    np.testing.assert_allclose(m2, m, atol=1e-4)
    np.testing.assert_allclose(c2 + 1e-8 * np.eye(3), c, atol=1e-4)
    again = fit_gaussian_mixture(torch.from_numpy(x), 3, generator=torch.Generator().manual_seed(5), shrinkage=0.0,
                                 iterations=500, tol=1e-10)
    assert torch.equal(again["means"], fit["means"])  # seeded: the same fit every time


def test_em_with_fewer_rows_than_components_and_with_identical_rows():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    fit = fit_gaussian_mixture(x, 3, generator=torch.Generator().manual_seed(0))
    assert fit["weights"].shape == (2,) and torch.allclose(fit["weights"].sum(), torch.tensor(1.0, dtype=torch.float64))
    same = torch.ones(6, 2, dtype=torch.float64)
    fit = fit_gaussian_mixture(same, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(fit["means"]).all() and torch.isfinite(fit["covariances"]).all()
    torch.linalg.cholesky(fit["covariances"])  # still a valid covariance (the ridge)


# ------------------------------------------------------------------ the mixture prior


def test_mixture_prior_samples_each_class_from_its_components():
    a, b = _two_clusters()
    vectors = torch.from_numpy(np.concatenate([a, b, b[:40] + [0.0, 20.0]]))
    classes = torch.tensor([1] * 1000 + [3] * 40)
    prior = ClassMixturePrior.fit(vectors, classes, num_classes=4, capsule_dim=2, mode="capsule", components=2,
                                  seed=7, shrinkage=0.0)
    assert prior.fitted_classes == [1, 3] and prior.counts.tolist() == [0, 1000, 0, 40]
    assert torch.equal(prior.weights[0], torch.zeros(2))  # never sampled
    latents = prior.sample(torch.full((20000,), 1), torch.Generator().manual_seed(1))
    assert latents.shape == (20000, 4, 2) and latents[:, [0, 2, 3]].abs().max() == 0
    drawn = latents[:, 1].double().numpy()
    left = drawn[:, 0] < 0
    assert left.mean() == pytest.approx(0.3, abs=0.015)
    np.testing.assert_allclose(drawn[left].mean(0), a.mean(0), atol=0.05)
    np.testing.assert_allclose(np.cov(drawn[~left], rowvar=False), np.cov(b, rowvar=False, bias=True), atol=0.06)
    with pytest.raises(CapsganError, match=r"class\(es\) \[0, 2\]"):
        prior.sample(torch.tensor([0, 2, 1]))
    again = prior_from_state_dict(prior.state_dict())
    assert isinstance(again, ClassMixturePrior)
    assert torch.equal(again.sample(torch.tensor([3, 1]), torch.Generator().manual_seed(2)),
                       prior.sample(torch.tensor([3, 1]), torch.Generator().manual_seed(2)))
    assert prior.describe() == ("class_mixture latent prior (2 Gaussian components per class, EM seed 7), "
                                "capsule mode, fitted on 1040 training images")


# ------------------------------------------------------------------ the true-slot prior


def _full_mode_vectors(k=3, d=2, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k * d, k * d, generator=g, dtype=torch.float64)
    classes = torch.arange(n) % k
    vectors = torch.randn(n, k * d, generator=g, dtype=torch.float64) @ mix * 0.3 + classes[:, None] * 1.0
    return vectors, classes


def test_true_slot_prior_varies_only_the_true_capsule_around_the_class_means():
    k, d = 3, 2
    vectors, classes = _full_mode_vectors(k, d)
    gaussian = ClassGaussianPrior.fit(vectors, classes, num_classes=k, capsule_dim=d, mode="full")
    prior = TrueSlotPrior(gaussian)
    latents = prior.sample(torch.full((30000,), 2), torch.Generator().manual_seed(0)).double()
    means = gaussian.means[2].view(k, d)
    others = latents[:, :2]  # capsules 0 and 1 of class-2 latents: exactly the class mean
    assert torch.allclose(others, means[:2].expand_as(others).float().double(), atol=0)
    slot = latents[:, 2].numpy()
    block = gaussian.covariances[2].view(k, d, k, d)[2, :, 2].numpy()
    np.testing.assert_allclose(slot.mean(0), means[2].numpy(), atol=0.01)
    np.testing.assert_allclose(np.cov(slot, rowvar=False), block, rtol=0.05, atol=1e-3)
    assert "class_true_slot latent prior" in prior.describe() and "full mode" in prior.describe()
    again = prior_from_state_dict(prior.state_dict())
    assert torch.equal(again.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(3)),
                       prior.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(3)))
    with pytest.raises(CapsganError, match="cannot sample"):
        TrueSlotPrior(ClassGaussianPrior.fit(vectors[classes != 1], classes[classes != 1], num_classes=k,
                                             capsule_dim=d, mode="full")).sample(torch.tensor([1]))


def test_true_slot_prior_in_capsule_mode_is_the_gaussian_itself():
    vectors, classes = torch.randn(40, 2, dtype=torch.float64), torch.arange(40) % 4
    gaussian = ClassGaussianPrior.fit(vectors, classes, num_classes=4, capsule_dim=2, mode="capsule")
    c = torch.tensor([0, 3, 2])
    assert torch.equal(TrueSlotPrior(gaussian).sample(c, torch.Generator().manual_seed(1)),
                       gaussian.sample(c, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("kind", ["gaussian", "true_slot", "mixture"])
def test_a_prior_temperature_scales_the_spread_of_the_draws_and_nothing_else(kind):
    k, d = 3, 2
    vectors, classes = _full_mode_vectors(k, d)
    cold = fit_latent_prior(kind, vectors, classes, num_classes=k, capsule_dim=d, mode="full", components=2,
                            temperature=0.5)
    warm = fit_latent_prior(kind, vectors, classes, num_classes=k, capsule_dim=d, mode="full", components=2)
    assert warm.temperature == 1.0 and cold.temperature == 0.5
    c = torch.full((40000,), 1)
    draws = {t: p.sample(c, torch.Generator().manual_seed(5)).double().flatten(1).numpy()
             for t, p in ((0.5, cold), (1.0, warm))}
    # The class's fitted mean and covariance, recomputed here from the rows in float64.
    rows = vectors[classes == 1].numpy()
    mean = rows.mean(0)
    np.testing.assert_allclose(draws[0.5].mean(0), mean, atol=0.02)
    if kind == "mixture":  # same component, same noise: the cold draw lies halfway between its component's mean
        centres = 2 * draws[0.5] - draws[1.0]  # and the warm draw, so 2 cold - warm is a component mean
        comp_means = cold.means[1].numpy()
        gap = np.abs(centres[:, None] - comp_means[None]).max(-1).min(1)
        assert gap.max() < 1e-4 and len(set(np.abs(centres[:, None] - comp_means[None]).max(-1).argmin(1))) == 2
    else:
        cov = np.cov(draws[0.5], rowvar=False)
        full = np.cov(draws[1.0], rowvar=False)
        np.testing.assert_allclose(cov, 0.25 * full, atol=2e-3)
        if kind == "gaussian":
            np.testing.assert_allclose(full, np.cov(rows, rowvar=False), rtol=0.06, atol=5e-3)
    assert "temperature 0.5" in cold.describe() and "temperature" not in warm.describe()
    again = prior_from_state_dict(cold.state_dict())
    assert again.temperature == 0.5
    assert torch.equal(again.sample(c[:8], torch.Generator().manual_seed(2)),
                       cold.sample(c[:8], torch.Generator().manual_seed(2)))


def test_fit_latent_prior_names_each_kind_and_refuses_others():
    vectors, classes = _full_mode_vectors()
    kinds = {kind: fit_latent_prior(kind, vectors, classes, num_classes=3, capsule_dim=2, mode="full", components=2)
             for kind in ("gaussian", "true_slot", "mixture")}
    assert kinds["gaussian"].describe() == "class_gaussian latent prior, full mode, fitted on 600 training images"
    assert [type(p).__name__ for p in kinds.values()] == ["ClassGaussianPrior", "TrueSlotPrior", "ClassMixturePrior"]
    with pytest.raises(CapsganError, match="gaussian, true_slot, mixture"):
        fit_latent_prior("gmm", vectors, classes, num_classes=3, capsule_dim=2, mode="full")


# ------------------------------------------------------------------ the batch prior of the generation path


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(9, 3, 2, generator=g, dtype=torch.float64)
    classes = torch.tensor([0, 1, 0, 2, 0, 1, 0, 1, 1])  # class 2 has a single row
    return latents, classes


def test_batch_prior_matches_a_loop_reference_with_the_same_random_weights():
    latents, classes = _batch()
    out = batch_prior_latents(latents, classes, generator=torch.Generator().manual_seed(4))
    w = torch.randn(9, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64).numpy()
    flat, c = latents.flatten(1).numpy(), classes.numpy()
    for i in range(9):
        members = [j for j in range(9) if c[j] == c[i]]
        mu = flat[members].mean(0)
        scale = 1.0 / np.sqrt(max(len(members) - 1, 1))
        want = mu + sum(w[i, j] * scale * (flat[j] - mu) for j in members)
        np.testing.assert_allclose(out[i].flatten().numpy(), want, atol=1e-12)
    assert torch.equal(out[3], latents[3])  # alone in its class: its own latent


def test_batch_prior_draws_have_the_batch_class_mean_and_sample_covariance():
    latents, classes = _batch(1)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([batch_prior_latents(latents, classes, generator=g) for _ in range(20000)])
    flat = latents.flatten(1).numpy()
    for k in (0, 1):
        members = (classes == k).numpy()
        drawn = draws[:, int(np.argmax(members))].flatten(1).numpy()
        np.testing.assert_allclose(drawn.mean(0), flat[members].mean(0), atol=0.03)
        np.testing.assert_allclose(np.cov(drawn, rowvar=False), np.cov(flat[members], rowvar=False), rtol=0.05,
                                   atol=0.03)


def test_batch_prior_true_slot_varies_only_the_class_capsule_and_passes_no_gradient():
    latents, classes = _batch(2)
    latents.requires_grad_(True)
    out = batch_prior_latents(latents, classes, true_slot=True, generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad
    for i in range(9):
        members = classes == classes[i]
        mean = latents.detach()[members].mean(0)
        for slot in range(3):
            same = torch.allclose(out[i, slot], mean[slot], atol=1e-12)
            varies = slot == int(classes[i]) and int(members.sum()) > 1  # a lone row is its class mean
            assert same != varies, (i, slot)


# ------------------------------------------------------------------ fitting on the training split


@pytest.fixture(scope="module")
def built(plugins):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["encoder"]["latent"] = "all"
    return build(resolve(recipe, plugins.registry), plugins)


def test_every_prior_kind_is_fitted_on_the_images_fit_prior_encodes(built):
    encoder, split = built.parts.encoder.eval(), built.dataset.split("train")
    gaussian = fit_prior(encoder, split, limit=40, seed=3, batch_size=16, device=CPU, num_classes=10)
    vectors, classes, mode = encode_training_split(encoder, split, limit=40, seed=3, batch_size=16, device=CPU)
    again = ClassGaussianPrior.fit(vectors, classes, num_classes=10, capsule_dim=encoder.capsule_dim, mode=mode)
    assert mode == "full" and torch.equal(again.means, gaussian.means) and torch.equal(again.counts, gaussian.counts)


@pytest.mark.parametrize(("kind", "name"), [(None, "class_gaussian"), ("true_slot", "class_true_slot"),
                                            ("mixture", "class_mixture")])
def test_the_objective_fits_the_prior_its_params_name(built, plugins, kind, name):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["encoder"]["latent"] = "all"
    if kind:
        recipe["objective"] = {"plugin": "reconstruction_gan", "prior": kind}
    objective = build(resolve(recipe, plugins.registry), plugins).objective.eval()
    objective.prepare_generation(built.dataset.split("train"), limit=40, seed=0, batch_size=16, device=CPU)
    assert objective.generation_description.startswith(f"{name} latent prior")
    images = objective.generate(torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()
    # prepare_generation's own prior argument overrides the params (for callers that choose one)
    objective.prepare_generation(built.dataset.split("train"), limit=40, seed=0, batch_size=16, device=CPU,
                                 prior="true_slot")
    assert objective.generation_description.startswith("class_true_slot latent prior")
    with pytest.raises(CapsganError, match="the priors are gaussian, true_slot, mixture"):
        objective.prepare_generation(built.dataset.split("train"), limit=40, seed=0, batch_size=16, device=CPU,
                                     prior="gmm")


def test_capsgan_eval_says_which_prior_made_the_samples(tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"]["epochs"] = 1
    recipe["objective"] = {"plugin": "reconstruction_gan", "prior": "mixture", "prior_components": 2}
    recipe["eval"] = {"metrics": ["gen_fid"], "num_images": 16, "prior_images": 40,
                      "features": {"domain": {"plugin": "domain_classifier", "epochs": 1, "channels": 8,
                                              "feature_dim": 16, "batch_size": 16}}}
    path = write_toml(tmp_path / "r.toml", recipe)
    assert invoke("run", path, "--out", tmp_path / "run", "--quiet").exit_code == 0
    result = invoke("eval", tmp_path / "run", "--set", f"eval.cache_dir={tmp_path / 'cache'}")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    described = json.dumps(report)
    assert "class_mixture latent prior (2 Gaussian components per class, EM seed 3)" in described, described


def test_eval_prior_chooses_the_prior_of_new_images_without_retraining(tmp_path):
    from capsgan_toolkit.recipe.diff import RERUN_IGNORED, RESUMABLE, recipe_diff

    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"]["epochs"] = 1  # objective.prior unset: the gaussian prior
    recipe["eval"] = {"metrics": ["gen_fid"], "num_images": 16, "prior_images": 40,
                      "features": {"domain": {"plugin": "domain_classifier", "epochs": 1, "channels": 8,
                                              "feature_dim": 16, "batch_size": 16}}}
    path = write_toml(tmp_path / "r.toml", recipe)
    run, cache = tmp_path / "run", f"eval.cache_dir={tmp_path / 'cache'}"
    assert invoke("run", path, "--out", run, "--quiet").exit_code == 0

    def images_of(result) -> str:
        assert result.exit_code == 0, result.output
        report = json.loads((run / "eval.json").read_text())
        (entry,) = report["protocol"].values()
        return entry["images"]

    assert "(class_gaussian latent prior," in images_of(invoke("eval", run, "--set", cache))  # the default
    chosen = invoke("eval", run, "--set", cache, "--set", "eval.prior=mixture", "--set", "eval.prior_components=2")
    assert "(class_mixture latent prior (2 Gaussian components per class" in images_of(chosen)
    assert json.loads((run / "eval.json").read_text())["eval"]["prior"] == "mixture"
    cold = invoke("eval", run, "--set", cache, "--set", "eval.prior_temperature=0.7")
    assert "(class_gaussian latent prior," in images_of(cold) and "temperature 0.7 (draws at 0.7 x" in images_of(cold)
    result = invoke("sample", run, "--n", 4, "--set", "eval.prior=true_slot", "--set", "eval.prior_images=40")
    assert result.exit_code == 0, result.output
    assert "new samples: class_true_slot latent prior" in result.output

    bad = invoke("eval", run, "--set", "eval.prior=gmm", catch_exceptions=True)
    assert bad.exit_code != 0 and "eval.prior" in bad.output and "'mixture'" in bad.output, bad.output
    bad = invoke("eval", run, "--set", "eval.prior_components=2", catch_exceptions=True)
    assert bad.exit_code != 0 and 'set eval.prior = "mixture"' in bad.output, bad.output
    # An [eval] key: a finished run is no different for a resume or a comparison's re-run.
    changed = copy.deepcopy(recipe)
    changed["eval"].update(prior="mixture", prior_components=4, prior_temperature=0.8)
    assert recipe_diff(recipe, changed, RESUMABLE) == recipe_diff(recipe, changed, RERUN_IGNORED) == []


def test_eval_prior_is_passed_only_when_set_and_an_objective_that_cannot_take_it_is_named():
    from capsgan_toolkit.catalogue import EvalSection
    from capsgan_toolkit.evaluation.evaluator import prepare_generation

    class Mine:
        name, calls = "mine", []

        def prepare_generation(self, train_split, *, limit, seed, batch_size, device, progress=None):
            self.calls.append(limit)

    objective = Mine()
    prepare_generation(objective, None, EvalSection(prior_images=7), device=CPU)  # no eval.prior: as before
    assert objective.calls == [7]
    with pytest.raises(CapsganError, match="eval.prior is 'mixture', but the mine objective's prepare_generation"):
        prepare_generation(objective, None, EvalSection(prior="mixture"), device=CPU)
