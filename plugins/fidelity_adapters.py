"""torch-fidelity's side of capsgan's feature extractors (see :mod:`capsgan_plugins.metric_features`).

Importing this module registers them in torch-fidelity's registry; the ``prepare`` of
each ``metric_features`` component imports it, so torch-fidelity (and torchvision) load
only when scores are computed. It also holds the domain classifier's network, which both
sides use; it imports nothing from :mod:`capsgan_plugins.metric_features` (one direction only).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

DOMAIN_FIDELITY_NAME = "capsgan-domain-classifier"
TF_TORCHSCRIPT_FIDELITY_NAME = "capsgan-inception-tf-torchscript"
"""Names of capsgan's extractors in torch-fidelity's registry."""


class DomainNet(nn.Module):
    """Conv classifier on uint8 RGB images; returns ``(features, logits)``.

    Images are scaled to [-1, 1] and resized (bilinear, antialiased) to the data set's
    size, so generated and real images of any size go through the same pipeline.
    """

    def __init__(self, num_classes: int, image_size: tuple[int, int], channels: int, feature_dim: int):
        super().__init__()
        self.image_size = tuple(image_size)

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        c = channels
        self.body = nn.Sequential(
            *block(3, c), *block(c, c), nn.MaxPool2d(2),
            *block(c, 2 * c), *block(2 * c, 2 * c), nn.MaxPool2d(2),
            *block(2 * c, 4 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.features = nn.Sequential(nn.Linear(4 * c, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        features = self.features(self.body(x))
        return features, self.head(features)


def load_domain_net(payload: dict) -> DomainNet:
    """Rebuild a saved :class:`DomainNet` in eval mode, leaving torch's random state as it was."""
    with torch.random.fork_rng(devices=[]):  # the throw-away initial weights draw random numbers
        net = DomainNet(**payload["arch"])
    net.load_state_dict(payload["state_dict"])
    return net.eval()


class DomainFidelityExtractor(FeatureExtractorBase):
    """torch-fidelity's view of a trained domain classifier: ``features`` and ``logits``."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None, "the domain classifier needs its trained weights file")
        self.net = load_domain_net(torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        features, logits = self.net(x)
        found = {"features": features, "logits": logits}
        return tuple(found[name].float() for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)


class TFTorchScriptFidelityExtractor(FeatureExtractorBase):
    """torch-fidelity's resizing and scaling, then the TorchScript TF Inception: ``2048`` features."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None, "the TorchScript Inception needs its file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, the file is TorchScript
            self.net = torch.jit.load(feature_extractor_weights_path, map_location="cpu")
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        return (self.net((x - 128) / 128).float(),)

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        vassert(metric != "isc", "The TorchScript TF Inception has no logits: the Inception Score needs "
                                 "torch-fidelity's weights file (extractor 'inception').")
        return "2048"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


for _name, _cls in ((DOMAIN_FIDELITY_NAME, DomainFidelityExtractor),
                    (TF_TORCHSCRIPT_FIDELITY_NAME, TFTorchScriptFidelityExtractor)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_name, _cls)
