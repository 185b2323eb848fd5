"""Priors over the encoder's latents, so the generator can make new images.

The generator was trained on the latent the encoder hands it (``Encoder.to_latent``):
with ``latent = "true_class"`` or ``"predicted_class"`` one class capsule (D numbers)
with the others zeroed; with ``latent = "all"`` every capsule (K x D numbers). Each
prior fits, per class, a distribution over exactly what the generator saw for that class:
the active capsule's D values (mode ``capsule``), or all K x D values (mode ``full``).
Sampling draws a class, draws from its distribution, and writes the vector back into a
``(K, D)`` latent (zeros elsewhere in mode ``capsule``). Three kinds (:data:`PRIOR_KINDS`):

- ``gaussian`` (:class:`ClassGaussianPrior`, the default): one Gaussian per class;
- ``true_slot`` (:class:`TrueSlotPrior`): only the true class's capsule varies, drawn from
  its marginal under the class Gaussian; every other capsule stays at its class-conditional
  mean (in mode ``capsule`` this is the Gaussian itself);
- ``mixture`` (:class:`ClassMixturePrior`): a few Gaussians per class, fitted by a seeded EM
  (:func:`fit_gaussian_mixture`: k-means++ and Lloyd's k-means to start, then EM).

Every prior has a ``temperature`` (default 1): draws scale their spread around the class
(or component) mean by it, ``mean + temperature * L z``; below 1 the draws keep closer to the
class's typical latents (a truncation, as in BigGAN's and Glow's sampling), trading variety for
fidelity. It is chosen at evaluation (``objective.prior_temperature``, ``eval.prior_temperature``)
and changes nothing fitted.

Every covariance is the (weighted) sample covariance plus a small ridge,
``shrinkage * trace(S) / V`` on the diagonal (plus 1e-8; ``S`` the class's sample covariance),
so a class with fewer images than dimensions still has a valid Cholesky factor.

:func:`batch_prior_latents` is the training-time counterpart: a draw from each class's
Gaussian estimated on one batch's own latents (the ``reconstruction_gan`` objective's
generation path, ``objective.prior_adversarial_weight``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch

from capsgan_toolkit.catalogue import PriorKind
from capsgan_toolkit.data import batch_loader
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.progress import progress_task

PRIOR_KINDS: tuple[str, ...] = get_args(PriorKind)
"""The latent priors an objective may fit (``objective.prior`` of ``reconstruction_gan``, or ``eval.prior``)."""


def _check_sampleable(counts: torch.Tensor, classes: torch.Tensor) -> None:
    if classes.numel() and (counts[classes] == 0).any():
        missing = sorted({int(k) for k in classes if counts[k] == 0})
        raise CapsganError(
            f"The latent prior cannot sample class(es) {missing}: no training image of them was encoded. "
            "Raise eval.prior_images or choose another class."
        )


def _temperature_text(temperature: float) -> str:
    return "" if temperature == 1.0 else f", temperature {temperature:g} (draws at {temperature:g} x the fitted spread)"


def _ridge(sample_cov: torch.Tensor, shrinkage: float) -> float:
    return float(shrinkage * torch.diagonal(sample_cov).mean() + 1e-8)


class ClassGaussianPrior:
    """Per-class Gaussian over the latent vector the generator sees.

    Build it with :meth:`fit`. ``means`` is ``(K, V)``, ``covariances`` and ``chol``
    ``(K, V, V)`` float64, ``counts`` ``(K,)``; classes with no training image have
    count 0 and are never sampled.
    """

    kind = "gaussian"

    def __init__(self, mode: Literal["capsule", "full"], num_classes: int, capsule_dim: int,
                 means: torch.Tensor, covariances: torch.Tensor, counts: torch.Tensor):
        self.mode = mode
        self.num_classes = num_classes
        self.capsule_dim = capsule_dim
        self.means = means
        self.covariances = covariances
        self.counts = counts
        self.chol = torch.linalg.cholesky(covariances)
        self.temperature = 1.0

    @classmethod
    def fit(cls, vectors: torch.Tensor, classes: torch.Tensor, *, num_classes: int, capsule_dim: int,
            mode: Literal["capsule", "full"], shrinkage: float = 1e-3) -> ClassGaussianPrior:
        """Fit one Gaussian per class.

        Args:
            vectors: ``(N, V)`` latent vectors: ``V = D`` in mode ``capsule`` (the active
                capsule), ``V = K * D`` in mode ``full`` (the flattened latent).
            classes: ``(N,)`` class of each vector.
            num_classes: ``K``.
            capsule_dim: ``D``.
            mode: ``capsule`` or ``full``.
            shrinkage: ridge added to the covariance, relative to its mean variance.
        """
        expected = capsule_dim if mode == "capsule" else num_classes * capsule_dim
        if vectors.ndim != 2 or vectors.shape[1] != expected:
            raise ValueError(f"mode {mode!r} needs vectors of size {expected}, got shape {tuple(vectors.shape)}")
        vectors = vectors.detach().double().cpu()
        classes = classes.detach().long().cpu()
        size = vectors.shape[1]
        means = torch.zeros(num_classes, size, dtype=torch.float64)
        covs = torch.zeros(num_classes, size, size, dtype=torch.float64)
        counts = torch.bincount(classes, minlength=num_classes)[:num_classes]
        if counts.sum() == 0:
            raise CapsganError("The latent prior has no training images to fit; raise eval.prior_images.")
        eye = torch.eye(size, dtype=torch.float64)
        for k in range(num_classes):
            group = vectors[classes == k]
            if group.shape[0] == 0:
                covs[k] = eye  # never sampled; keeps the Cholesky factor defined
                continue
            means[k] = group.mean(0)
            centred = group - means[k]
            sample = centred.T @ centred / max(group.shape[0] - 1, 1)
            covs[k] = sample + _ridge(sample, shrinkage) * eye
        return cls(mode, num_classes, capsule_dim, means, covs, counts)

    @property
    def fitted_classes(self) -> list[int]:
        """Classes that had training images (the ones that can be sampled)."""
        return [k for k in range(self.num_classes) if self.counts[k] > 0]

    def balanced_classes(self, n: int) -> torch.Tensor:
        """Return ``n`` class labels cycling through the fitted classes (balanced to within one)."""
        fitted = torch.tensor(self.fitted_classes, dtype=torch.long)
        return fitted[torch.arange(n) % len(fitted)]

    def sample(self, classes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one latent ``(K, D)`` per entry of ``classes``; returns ``(n, K, D)`` float32."""
        classes = classes.long().cpu()
        _check_sampleable(self.counts, classes)
        noise = torch.randn(classes.shape[0], self.means.shape[1], generator=generator, dtype=torch.float64)
        noise = noise * self.temperature
        vectors = self.means[classes] + torch.einsum("nij,nj->ni", self.chol[classes], noise)
        if self.mode == "full":
            return vectors.view(-1, self.num_classes, self.capsule_dim).float()
        latent = torch.zeros(classes.shape[0], self.num_classes, self.capsule_dim, dtype=torch.float64)
        latent[torch.arange(classes.shape[0]), classes] = vectors
        return latent.float()

    def describe(self) -> str:
        """One line for ``eval.json``: which prior, which mode, fitted on how many images."""
        return (f"class_gaussian latent prior, {self.mode} mode, fitted on {int(self.counts.sum())} training images"
                f"{_temperature_text(self.temperature)}")

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "num_classes": self.num_classes, "capsule_dim": self.capsule_dim,
                "means": self.means, "covariances": self.covariances, "counts": self.counts,
                "temperature": self.temperature}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ClassGaussianPrior:
        prior = cls(state["mode"], state["num_classes"], state["capsule_dim"], state["means"],
                    state["covariances"], state["counts"])
        prior.temperature = float(state.get("temperature", 1.0))
        return prior


class TrueSlotPrior:
    """Only the true class's capsule varies; every other capsule sits at its class-conditional mean.

    Built from a fitted :class:`ClassGaussianPrior`. In mode ``full`` a latent of class ``k``
    is the class mean ``means[k]`` (all K x D values) with capsule ``k`` replaced by a draw
    from its marginal under the class Gaussian: mean ``means[k]`` restricted to capsule ``k``,
    covariance the ``(D, D)`` block of ``covariances[k]`` for capsule ``k``. In mode
    ``capsule`` the Gaussian already covers only the true capsule, and this prior samples
    exactly as it does.
    """

    kind = "true_slot"

    def __init__(self, gaussian: ClassGaussianPrior):
        self.gaussian = gaussian  # its temperature is this prior's
        self.mode, self.num_classes, self.capsule_dim = gaussian.mode, gaussian.num_classes, gaussian.capsule_dim
        self.counts = gaussian.counts
        if self.mode == "full":
            k, d = self.num_classes, self.capsule_dim
            covs = gaussian.covariances.view(k, k, d, k, d)
            blocks = covs[torch.arange(k), torch.arange(k), :, torch.arange(k)]  # (K, D, D): class k, capsule k
            self.slot_means = gaussian.means.view(k, k, d)[torch.arange(k), torch.arange(k)]  # (K, D)
            self.slot_chol = torch.linalg.cholesky(blocks)

    fitted_classes = ClassGaussianPrior.fitted_classes
    balanced_classes = ClassGaussianPrior.balanced_classes

    @property
    def temperature(self) -> float:
        return self.gaussian.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.gaussian.temperature = value

    def sample(self, classes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one latent ``(K, D)`` per entry of ``classes``; returns ``(n, K, D)`` float32."""
        if self.mode == "capsule":
            return self.gaussian.sample(classes, generator)
        classes = classes.long().cpu()
        _check_sampleable(self.counts, classes)
        n, k, d = classes.shape[0], self.num_classes, self.capsule_dim
        noise = torch.randn(n, d, generator=generator, dtype=torch.float64) * self.temperature
        latent = self.gaussian.means[classes].view(n, k, d).clone()
        latent[torch.arange(n), classes] = self.slot_means[classes] + torch.einsum(
            "nij,nj->ni", self.slot_chol[classes], noise)
        return latent.float()

    def describe(self) -> str:
        """One line for ``eval.json``: which prior, which mode, fitted on how many images."""
        return ("class_true_slot latent prior (the true class's capsule from its class Gaussian, the other "
                f"capsules at their class means), {self.mode} mode, fitted on {int(self.counts.sum())} training images"
                f"{_temperature_text(self.temperature)}")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "gaussian": self.gaussian.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrueSlotPrior:
        return cls(ClassGaussianPrior.from_state_dict(state["gaussian"]))


# ------------------------------------------------------------------ a Gaussian mixture per class


def _log_gaussian(x: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Log density of ``N(mean, L L^T)`` at each row of ``x``."""
    z = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False)  # (V, n)
    log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return -0.5 * (z.pow(2).sum(0) + log_det + x.shape[1] * math.log(2.0 * math.pi))


def _kmeans(x: torch.Tensor, m: int, generator: torch.Generator, iterations: int = 20) -> torch.Tensor:
    """Hard assignments ``(n,)`` of Lloyd's k-means started from k-means++ seeds."""
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=generator))]]
    for _ in range(1, m):
        dist = torch.cdist(x, torch.stack(centres)).pow(2).min(1).values
        if float(dist.sum()) <= 0.0:  # every point sits on a centre already: pick any
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(dist / dist.sum(), 1, generator=generator))
        centres.append(x[pick])
    c = torch.stack(centres)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iterations):
        for j in range(m):
            members = x[assign == j]
            if members.shape[0]:
                c[j] = members.mean(0)  # an empty cluster keeps its centre
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def fit_gaussian_mixture(x: torch.Tensor, components: int, *, generator: torch.Generator, iterations: int = 100,
                         tol: float = 1e-7, shrinkage: float = 1e-3) -> dict[str, Any]:
    """Fit a Gaussian mixture with full covariances to the rows of ``x`` by EM.

    Seeded and deterministic: k-means++ seeds from ``generator``, Lloyd's k-means, then EM
    from the k-means clusters until the mean log-likelihood per row rises by less than
    ``tol`` (or ``iterations`` EM steps). Each M-step covariance gets the ridge
    ``shrinkage * trace(S) / V + 1e-8`` (``S``: the covariance of all of ``x``); with
    ``shrinkage = 0`` the EM is plain maximum likelihood and its log-likelihood never falls.

    Args:
        x: ``(n, V)`` rows (converted to float64).
        components: the number of Gaussians ``M`` (fewer, ``n``, when there are fewer rows).
        generator: the random numbers of the k-means++ seeding.
        iterations: most EM steps.
        tol: stop when the mean log-likelihood per row rises by less.
        shrinkage: the ridge, relative to the data's mean variance.

    Returns:
        ``weights`` ``(M,)``, ``means`` ``(M, V)``, ``covariances`` ``(M, V, V)`` and
        ``log_likelihood`` (the mean per row after each EM step, a list).
    """
    x = x.detach().double().cpu()
    n, v = x.shape
    m = max(1, min(components, n))
    centred = x - x.mean(0)
    eye = torch.eye(v, dtype=torch.float64)
    ridge = _ridge(centred.T @ centred / max(n - 1, 1), shrinkage)
    resp = torch.nn.functional.one_hot(_kmeans(x, m, generator) if m > 1 else torch.zeros(n, dtype=torch.long),
                                       m).double()
    history: list[float] = []
    weights = means = covs = None
    for step in range(iterations + 1):
        # M-step from the responsibilities (the k-means clusters first)
        mass = resp.sum(0)
        alive = mass > 1e-8
        safe = mass.clamp_min(1e-8)
        weights = mass / n
        means = torch.where(alive[:, None], resp.T @ x / safe[:, None], x.mean(0))
        diff = x[None] - means[:, None]  # (M, n, V)
        covs = torch.einsum("mn,mni,mnj->mij", resp.T, diff, diff) / safe[:, None, None] + ridge * eye
        covs = torch.where(alive[:, None, None], covs, centred.T @ centred / max(n - 1, 1) + ridge * eye)
        if step == iterations:
            break
        # E-step
        chol = torch.linalg.cholesky(covs)
        log_p = torch.stack([_log_gaussian(x, means[j], chol[j]) for j in range(m)], 1)
        log_p = log_p + torch.log(weights.clamp_min(1e-300))
        total = torch.logsumexp(log_p, 1)
        history.append(float(total.mean()))
        resp = torch.exp(log_p - total[:, None])
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
    return {"weights": weights, "means": means, "covariances": covs, "log_likelihood": history}


class ClassMixturePrior:
    """A Gaussian mixture of a few components per class over the latent vector the generator sees.

    Build it with :meth:`fit`. ``weights`` is ``(K, M)`` (zero for components a class did not
    get, and for every component of a class with no training image), ``means`` ``(K, M, V)``,
    ``covariances`` ``(K, M, V, V)`` float64, ``counts`` ``(K,)``.
    """

    kind = "mixture"

    def __init__(self, mode: Literal["capsule", "full"], num_classes: int, capsule_dim: int, weights: torch.Tensor,
                 means: torch.Tensor, covariances: torch.Tensor, counts: torch.Tensor, seed: int):
        self.mode, self.num_classes, self.capsule_dim = mode, num_classes, capsule_dim
        self.weights, self.means, self.covariances, self.counts, self.seed = weights, means, covariances, counts, seed
        self.components = weights.shape[1]
        self.chol = torch.linalg.cholesky(covariances)
        self.temperature = 1.0

    @classmethod
    def fit(cls, vectors: torch.Tensor, classes: torch.Tensor, *, num_classes: int, capsule_dim: int,
            mode: Literal["capsule", "full"], components: int = 3, seed: int = 0,
            shrinkage: float = 1e-3) -> ClassMixturePrior:
        """Fit one mixture per class with :func:`fit_gaussian_mixture`, classes in turn from one seeded generator.

        Args:
            vectors, classes, num_classes, capsule_dim, mode: as :meth:`ClassGaussianPrior.fit`.
            components: Gaussians per class (fewer for a class with fewer images).
            seed: seeds the k-means++ starts.
            shrinkage: the ridge, relative to a class's mean variance.
        """
        expected = capsule_dim if mode == "capsule" else num_classes * capsule_dim
        if vectors.ndim != 2 or vectors.shape[1] != expected:
            raise ValueError(f"mode {mode!r} needs vectors of size {expected}, got shape {tuple(vectors.shape)}")
        vectors, classes = vectors.detach().double().cpu(), classes.detach().long().cpu()
        size = vectors.shape[1]
        counts = torch.bincount(classes, minlength=num_classes)[:num_classes]
        if counts.sum() == 0:
            raise CapsganError("The latent prior has no training images to fit; raise eval.prior_images.")
        weights = torch.zeros(num_classes, components, dtype=torch.float64)
        means = torch.zeros(num_classes, components, size, dtype=torch.float64)
        covs = torch.eye(size, dtype=torch.float64).repeat(num_classes, components, 1, 1)
        generator = torch.Generator().manual_seed(seed)
        for k in range(num_classes):
            group = vectors[classes == k]
            if group.shape[0] == 0:
                continue
            fit = fit_gaussian_mixture(group, components, generator=generator, shrinkage=shrinkage)
            m = fit["weights"].shape[0]
            weights[k, :m], means[k, :m], covs[k, :m] = fit["weights"], fit["means"], fit["covariances"]
        return cls(mode, num_classes, capsule_dim, weights, means, covs, counts, seed)

    fitted_classes = ClassGaussianPrior.fitted_classes
    balanced_classes = ClassGaussianPrior.balanced_classes

    def sample(self, classes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a component, then a latent ``(K, D)``, per entry of ``classes``; returns ``(n, K, D)`` float32."""
        classes = classes.long().cpu()
        _check_sampleable(self.counts, classes)
        n = classes.shape[0]
        if n == 0:
            return torch.zeros(0, self.num_classes, self.capsule_dim)
        component = torch.multinomial(self.weights[classes], 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.means.shape[2], generator=generator, dtype=torch.float64) * self.temperature
        vectors = self.means[classes, component] + torch.einsum("nij,nj->ni", self.chol[classes, component], noise)
        if self.mode == "full":
            return vectors.view(-1, self.num_classes, self.capsule_dim).float()
        latent = torch.zeros(n, self.num_classes, self.capsule_dim, dtype=torch.float64)
        latent[torch.arange(n), classes] = vectors
        return latent.float()

    def describe(self) -> str:
        """One line for ``eval.json``: which prior, which mode, fitted on how many images."""
        return (f"class_mixture latent prior ({self.components} Gaussian components per class, EM seed {self.seed}), "
                f"{self.mode} mode, fitted on {int(self.counts.sum())} training images"
                f"{_temperature_text(self.temperature)}")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mode": self.mode, "num_classes": self.num_classes,
                "capsule_dim": self.capsule_dim, "weights": self.weights, "means": self.means,
                "covariances": self.covariances, "counts": self.counts, "seed": self.seed,
                "temperature": self.temperature}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ClassMixturePrior:
        prior = cls(state["mode"], state["num_classes"], state["capsule_dim"], state["weights"], state["means"],
                    state["covariances"], state["counts"], state["seed"])
        prior.temperature = float(state.get("temperature", 1.0))
        return prior


LatentPrior = ClassGaussianPrior | TrueSlotPrior | ClassMixturePrior


def prior_from_state_dict(state: dict[str, Any]) -> LatentPrior:
    """Rebuild any prior from its ``state_dict()`` (a state without ``kind`` is a :class:`ClassGaussianPrior`)."""
    kind = state.get("kind", "gaussian")
    return {"gaussian": ClassGaussianPrior, "true_slot": TrueSlotPrior,
            "mixture": ClassMixturePrior}[kind].from_state_dict(state)


# ------------------------------------------------------------------ fitting on a training split


def encode_training_split(encoder, split, *, limit: int, seed: int, batch_size: int, device: torch.device,
                          progress=None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Encode (up to ``limit``, 0: all) training images for a prior: ``(vectors, classes, mode)``.

    The same images in the same order as ``capsgan_toolkit.evaluation.evaluator.fit_prior``
    (a permutation seeded with ``seed + 1``), so every prior kind is fitted on the same latents.
    """
    from torch.utils.data import Subset

    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 1))
    order = order[:limit] if limit else order
    loader = batch_loader(Subset(split, order.tolist()), batch_size=batch_size)
    with progress_task(progress, f"Fitting the latent prior on {len(order)} training images", len(loader)) as advance:
        def counted():
            for batch in loader:
                yield batch
                advance(1)

        return encode_for_prior(encoder, counted(), device=device)


def fit_latent_prior(kind: str, vectors: torch.Tensor, classes: torch.Tensor, *, num_classes: int,
                     capsule_dim: int, mode: Literal["capsule", "full"], components: int = 3,
                     seed: int = 0, temperature: float = 1.0) -> LatentPrior:
    """Fit the prior ``kind`` (one of :data:`PRIOR_KINDS`) on encoded latents; it draws at ``temperature``."""
    if kind not in PRIOR_KINDS:
        raise CapsganError(f"Unknown latent prior {kind!r}; the priors are {', '.join(PRIOR_KINDS)}.")
    prior: LatentPrior
    if kind == "mixture":
        prior = ClassMixturePrior.fit(vectors, classes, num_classes=num_classes, capsule_dim=capsule_dim, mode=mode,
                                      components=components, seed=seed)
    else:
        gaussian = ClassGaussianPrior.fit(vectors, classes, num_classes=num_classes, capsule_dim=capsule_dim,
                                          mode=mode)
        prior = TrueSlotPrior(gaussian) if kind == "true_slot" else gaussian
    prior.temperature = temperature
    return prior


# ------------------------------------------------------------------ during training: the batch's own latents


def batch_prior_latents(latents: torch.Tensor, classes: torch.Tensor, *, true_slot: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one latent per row from its class's Gaussian estimated on this batch's own latents.

    For a row of class ``c``, with ``n`` rows of class ``c`` in the batch, their mean ``mu``
    and deviations ``d_j = z_j - mu``: ``mu + sum_j w_j d_j`` with ``w_j ~ N(0, 1 / (n - 1))``,
    a draw from ``N(mu, S)`` where ``S = sum_j d_j d_j^T / (n - 1)`` is the class's sample
    covariance in the batch (without forming ``S``: the draw lies in the span of the class's
    own latents). A class with one row in the batch gives that row's latent back.
    With ``true_slot``, only capsule ``c`` varies and the others sit at their batch class means
    (``classes`` must then index capsules). No gradient flows back into ``latents``.

    Args:
        latents: ``(B, K, D)``: what the generator saw (``Encoder.to_latent``).
        classes: ``(B,)``: the class of each row (the capsule that is active in masked latents).
        true_slot: vary only the class's own capsule.
        generator: random numbers (``None``: the global generator of ``latents``' device, which
            checkpoints save, so a resumed run draws the same).
    """
    flat = latents.detach().flatten(1)
    same = (classes[:, None] == classes[None, :]).to(flat.dtype)
    count = same.sum(1, keepdim=True)
    mean = same @ flat / count
    weights = torch.randn(same.shape, generator=generator, device=flat.device, dtype=flat.dtype)
    weights = weights * same / (count - 1).clamp_min(1).sqrt()
    draw = weights @ (flat - mean)
    if true_slot:
        k, d = latents.shape[1], latents.shape[2]
        draw = draw * torch.nn.functional.one_hot(classes.long(), k).to(flat.dtype).repeat_interleave(d, dim=1)
    return (mean + draw).view_as(latents)


@torch.no_grad()
def encode_for_prior(encoder, images_and_labels, *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Encode batches of ``(images, labels)`` into the vectors and classes the prior fits.

    Returns ``(vectors, classes, mode)`` following the encoder's ``latent`` param: the
    true class's capsule (``true_class``, what the generator saw in training), the
    predicted class's capsule (``predicted_class``), or all capsules grouped by true
    class (``all``).
    """
    latent_mode = getattr(encoder.params, "latent", "all")
    vectors, classes = [], []
    for images, labels in images_and_labels:
        capsules = encoder(images.to(device)).float().cpu()
        labels = labels.long().cpu()
        if latent_mode == "all":
            vectors.append(capsules.flatten(1))
            classes.append(labels)
            continue
        index = labels if latent_mode == "true_class" else encoder.class_scores(capsules).argmax(1)
        vectors.append(capsules[torch.arange(capsules.shape[0]), index])
        classes.append(index)
    if not vectors:
        raise CapsganError("The latent prior has no training images to fit; raise eval.prior_images.")
    return torch.cat(vectors), torch.cat(classes), ("full" if latent_mode == "all" else "capsule")
