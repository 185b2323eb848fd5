"""A prior over the encoder's latents, so the generator can make new images.

The generator was trained on the latent the encoder hands it (``Encoder.to_latent``):
with ``latent = "true_class"`` or ``"predicted_class"`` one class capsule (D numbers)
with the others zeroed; with ``latent = "all"`` every capsule (K x D numbers). The
prior fits, per class, a Gaussian over exactly what the generator saw for that class:
the active capsule's D values (mode ``capsule``), or all K x D values (mode ``full``).
Sampling draws a class, draws from its Gaussian, and writes the vector back into a
``(K, D)`` latent (zeros elsewhere in mode ``capsule``).

The covariance is the sample covariance plus a small ridge,
``shrinkage * trace(S) / V`` on the diagonal (plus 1e-8), so a class with fewer
images than dimensions still has a valid Cholesky factor.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from capsgan_toolkit.errors import CapsganError


class ClassGaussianPrior:
    """Per-class Gaussian over the latent vector the generator sees.

    Build it with :meth:`fit`. ``means`` is ``(K, V)``, ``covariances`` and ``chol``
    ``(K, V, V)`` float64, ``counts`` ``(K,)``; classes with no training image have
    count 0 and are never sampled.
    """

    def __init__(self, mode: Literal["capsule", "full"], num_classes: int, capsule_dim: int,
                 means: torch.Tensor, covariances: torch.Tensor, counts: torch.Tensor):
        self.mode = mode
        self.num_classes = num_classes
        self.capsule_dim = capsule_dim
        self.means = means
        self.covariances = covariances
        self.counts = counts
        self.chol = torch.linalg.cholesky(covariances)

    @classmethod
    def fit(cls, vectors: torch.Tensor, classes: torch.Tensor, *, num_classes: int, capsule_dim: int,
            mode: Literal["capsule", "full"], shrinkage: float = 1e-3) -> "ClassGaussianPrior":
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
            ridge = shrinkage * torch.diagonal(sample).mean() + 1e-8
            covs[k] = sample + ridge * eye
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
        if classes.numel() and (self.counts[classes] == 0).any():
            missing = sorted({int(k) for k in classes if self.counts[k] == 0})
            raise CapsganError(
                f"The latent prior cannot sample class(es) {missing}: no training image of them was encoded. "
                "Raise eval.prior_images or choose another class."
            )
        noise = torch.randn(classes.shape[0], self.means.shape[1], generator=generator, dtype=torch.float64)
        vectors = self.means[classes] + torch.einsum("nij,nj->ni", self.chol[classes], noise)
        if self.mode == "full":
            return vectors.view(-1, self.num_classes, self.capsule_dim).float()
        latent = torch.zeros(classes.shape[0], self.num_classes, self.capsule_dim, dtype=torch.float64)
        latent[torch.arange(classes.shape[0]), classes] = vectors
        return latent.float()

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "num_classes": self.num_classes, "capsule_dim": self.capsule_dim,
                "means": self.means, "covariances": self.covariances, "counts": self.counts}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ClassGaussianPrior":
        return cls(state["mode"], state["num_classes"], state["capsule_dim"], state["means"],
                   state["covariances"], state["counts"])


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
