"""The classifiers: heads on pretrained backbones, the fine-tuned top, ensembles, a from-scratch CNN.

A model is rebuilt from its bundle by :func:`load_model`: the architecture from ``metadata.json``
(:class:`ModelSpec`), the input size from ``preprocessing.json`` (the one copy of it; the Lite
stem's static padding depends on it), the weights from ``weights.pt``.
"""

from __future__ import annotations

import copy
import logging
import math
import types
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from catsdogs import CatsdogsError
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.training.backbones import (
    BACKBONES,
    IMAGENET_CAT_CLASSES,
    IMAGENET_DOG_CLASSES,
    LiteFeatures,
    frozen_trunk,
    imagenet_head,
)

if TYPE_CHECKING:
    from catsdogs.bundle import ModelBundle

logger = logging.getLogger(__name__)

HeadKind = Literal["linear", "mlp"]
SIMPLE_CNN_SIZE = 128
"""The from-scratch CNN's input size unless ``image_size`` is configured."""

ARCHITECTURES = (*BACKBONES, "simple_cnn")


def check_architecture(name: str) -> str:
    """Return ``name`` if known, else raise an error listing the choices."""
    if name not in ARCHITECTURES:
        raise CatsdogsError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return name


def build_head(
    kind: HeadKind, *, in_features: int, num_classes: int, hidden: int, dropout: float
) -> nn.Module:
    """Classifier on top of the features: logistic regression or a one-hidden-layer MLP."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
    raise CatsdogsError(f"unknown head {kind!r}; choose linear or mlp")


class TransferClassifier(nn.Module):
    """Backbone features followed by a trainable head: what serving runs (one ONNX graph)."""

    def __init__(self, backbone: LiteFeatures, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class FinetuneTop(nn.Module):
    """The trainable part of a fine-tuned :class:`TransferClassifier`: its last ``blocks`` backbone
    blocks, the head convolution and the classifier, fed with cached trunk activations (or, with
    ``from_images``, with images that it passes through the frozen trunk itself).

    It shares its parameters with ``model``, so training it trains the full model in place. The
    trunk is frozen and always in eval mode; batch-norm layers keep their ImageNet statistics (only
    their affine parameters learn), which is stable with CPU-sized batches.
    """

    def __init__(
        self,
        model: TransferClassifier,
        *,
        blocks: int,
        from_images: bool = False,
        bf16: bool = False,
        fold_batch_norms: bool = True,
    ) -> None:
        super().__init__()
        backbone = model.backbone
        if not 0 <= blocks <= backbone.num_blocks:
            raise CatsdogsError(f"finetune_blocks must be between 0 and {backbone.num_blocks}, not {blocks}")
        self.model, self.start, self.from_images = model, backbone.num_blocks - blocks, from_images
        self.bf16, self.fold_batch_norms = bf16, fold_batch_norms
        if from_images:
            # Channels-last convolutions run 1.35x faster on this CPU (Lite2, 14 blocks, batch 32,
            # 224 px); forward() hands the trunk its images in the same layout.
            model.to(memory_format=torch.channels_last)
            # Kept in a tuple: not a submodule, so not in state dicts, optimizers or averages.
            self._fused_trunk = (frozen_trunk(backbone, stop=self.start),)
            if bf16:
                self._fused_trunk += (copy.deepcopy(self._fused_trunk[0]).to(torch.bfloat16),)
        if bf16:
            for module in self.top_modules():
                for conv in module.modules():
                    if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1:
                        conv.forward = types.MethodType(_pointwise_forward, conv)
        trainable = {id(p) for p in self.top_parameters()} | {id(p) for p in model.head.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)

    def top_modules(self) -> list[nn.Module]:
        """The backbone layers that fine-tuning unfreezes."""
        net = self.model.backbone.net
        return [*net._blocks[self.start :], net._conv_head, net._bn1]

    def top_parameters(self) -> list[nn.Parameter]:
        """The backbone parameters that fine-tuning unfreezes."""
        return [p for module in self.top_modules() for p in module.parameters()]

    def param_groups(self, lr: float, *, backbone_lr_scale: float) -> list[dict]:
        """The head learns at ``lr``; the pretrained blocks at a fraction of it."""
        return [
            {"params": list(self.model.head.parameters()), "lr": lr},
            {"params": self.top_parameters(), "lr": lr * backbone_lr_scale},
        ]

    def _apply(self, fn, recurse: bool = True) -> FinetuneTop:  # .to(device), .float(): the copy too
        super()._apply(fn, recurse)
        for trunk in getattr(self, "_fused_trunk", ()):
            trunk._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> FinetuneTop:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        net = self.model.backbone.net
        for frozen in net._blocks[: self.start]:
            frozen.eval()  # no stochastic depth below the trained blocks
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_images:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                if self.bf16 and self.training:
                    x = self._fused_trunk[1].trunk(x.to(torch.bfloat16), stop=self.start).float()
                else:
                    x = self._fused_trunk[0].trunk(x, stop=self.start)
        # The trained blocks' batch norms are always in eval mode here (this train() sees to it),
        # so folding them is exact.
        top = self.model.backbone.top(x, start=self.start, fold_batch_norms=self.fold_batch_norms)
        return self.model.head(top)


def _pointwise_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution computed in bfloat16 while training (``FinetuneTop(bf16=True)``), float32
    otherwise. Its weights, gradients and optimizer state stay float32; only the product is rounded.

    Only the pointwise convolutions: bfloat16 matrix products run on the CPU's AMX units, but with
    the depthwise convolutions in bfloat16 a step took 1.23 s instead of 0.78 (their backward pass;
    README, "Training"). Bound with ``types.MethodType`` so that copies (the moving average)
    rebind it to their own layer.
    """
    if not conv.training:
        return type(conv).forward(conv, x)
    pad = getattr(conv, "static_padding", None)  # the library's "same" padding layer, if any
    if pad is not None:
        x = pad(x)
    bias = None if conv.bias is None else conv.bias.to(torch.bfloat16)
    out = nn.functional.conv2d(
        x.to(torch.bfloat16), conv.weight.to(torch.bfloat16), bias, conv.stride, conv.padding, conv.dilation
    )
    return out.float()


class Ensemble(nn.Module):
    """Several classifiers as one: the output is ``log(mean_i softmax(member_i(x)))``, so the softmax
    that evaluation and serving apply gives the members' mean probabilities, from one ONNX graph."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise CatsdogsError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_of_softmaxes([member(x) for member in self.members])


def mean_of_softmaxes(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits whose softmax is the mean of the given logits' softmaxes (how an ensemble combines)."""
    log_probs = torch.stack([torch.log_softmax(member_logits, dim=1) for member_logits in logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


def divide_logits(model: nn.Module, temperature: float) -> None:
    """Fold a temperature into the model's last linear layer (logits / T), so the exported graph
    serves calibrated probabilities at no cost. Predictions are unchanged for ``T > 0``."""
    if not temperature > 0:
        raise CatsdogsError(f"temperature must be positive, not {temperature}")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CatsdogsError("the model has no linear layer to fold a temperature into")
    with torch.no_grad():
        linears[-1].weight.div_(temperature)
        if linears[-1].bias is not None:
            linears[-1].bias.div_(temperature)


class SimpleCNN(nn.Module):
    """The from-scratch baseline: five conv-BN-ReLU-pool stages (16→256 channels), global pooling,
    a linear layer. About 85 M multiply-adds at 128 px, so a CPU epoch over 16k images takes minutes."""

    def __init__(self, *, num_classes: int = 2, width: int = 16, dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for multiplier in (1, 2, 4, 8, 16):
            out = width * multiplier
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class ServingGraph(nn.Module):
    """What ``model.onnx`` computes from one pass: the logits; the pooled features and the ImageNet
    pet mass the unknown detector judges (:mod:`catsdogs.ood`); and, where the head is linear on
    pooled features, the class activation maps behind ``/explain``.

    The pet mass is the probability the backbone's own pretrained ImageNet classifier, applied to the
    model's pooled features, gives the ImageNet cat and dog classes: the fine-tuned last blocks keep
    features that head still reads, so no second branch through the original blocks is needed.

    For a linear head ``logits = W · mean_hw(F) + b``, so ``W · F[:, :, h, w] + b`` is exactly how
    much each place voted for each class (its mean over places is the logits): no gradients, and
    serving computes it in ONNX Runtime. An ensemble averages its members' maps and pet masses (when
    every member has them); an MLP head has no map, the from-scratch CNN neither map nor pet mass.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.has_cam = activation_maps_available(model)
        members = list(model.members) if isinstance(model, Ensemble) else [model]
        pretrained = all(isinstance(m, TransferClassifier) for m in members)
        self.imagenet_heads = nn.ModuleList(
            [imagenet_head(m.backbone.architecture) for m in members] if pretrained else []
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        from catsdogs.runtime import CAM_NAME, FEATURES_NAME, OUTPUT_NAME, PET_MASS_NAME

        return (
            (OUTPUT_NAME, FEATURES_NAME)
            + ((PET_MASS_NAME,) if len(self.imagenet_heads) else ())
            + ((CAM_NAME,) if self.has_cam else ())
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, features, cam = _graph_outputs(self.model, x)
        outputs: tuple[torch.Tensor, ...] = (logits, features)
        if len(self.imagenet_heads):
            width = features.shape[1] // len(self.imagenet_heads)
            masses = [
                _pet_mass(head(features[:, k * width : (k + 1) * width]))
                for k, head in enumerate(self.imagenet_heads)
            ]
            outputs += (torch.stack(masses).mean(0),)
        return outputs + ((cam,) if self.has_cam and cam is not None else ())


def _pet_mass(imagenet_logits: torch.Tensor) -> torch.Tensor:
    probabilities = torch.softmax(imagenet_logits, dim=1)
    pets = [*IMAGENET_CAT_CLASSES, *IMAGENET_DOG_CLASSES]
    return probabilities[:, pets].sum(1)


def activation_maps_available(model: nn.Module) -> bool:
    """Exact class activation maps exist: a linear head on a backbone's pooled features (every member's)."""
    if isinstance(model, Ensemble):
        return all(activation_maps_available(member) for member in model.members)
    return isinstance(model, TransferClassifier) and _linear_head(model.head) is not None


def _linear_head(head: nn.Module) -> nn.Linear | None:
    layers = [m for m in head.modules() if not isinstance(m, (nn.Sequential, nn.Dropout))]
    return layers[0] if len(layers) == 1 and isinstance(layers[0], nn.Linear) else None


def _graph_outputs(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logits, pooled features, activation maps or None) of one model, from one forward pass."""
    if isinstance(model, Ensemble):
        outputs = [_graph_outputs(member, x) for member in model.members]
        cams = [cam for _, _, cam in outputs]
        return (
            mean_of_softmaxes([logits for logits, _, _ in outputs]),
            torch.cat([features for _, features, _ in outputs], dim=1),
            None if any(cam is None for cam in cams) else torch.stack(cams).mean(0),
        )
    if isinstance(model, SimpleCNN):
        features = model.features(x).mean(dim=(2, 3))
        return model.classifier(features), features, None
    fmap = model.backbone.feature_map(x)
    features = fmap.mean(dim=(2, 3))
    linear = _linear_head(model.head)
    cam = None
    if linear is not None:
        # A 1x1 convolution with the head's weights: the same sums as an einsum, and ONNX Runtime
        # runs it in a few microseconds (its Einsum cost 0.17 ms a pass, on every pass).
        cam = nn.functional.conv2d(fmap, linear.weight[:, :, None, None], linear.bias)
    return model.head(features), features, cam


@dataclass(frozen=True)
class ModelSpec:
    """The network's architecture (stored in metadata.json); its input size is the preprocessing
    config's :attr:`~catsdogs.preprocessing.PreprocessConfig.image_size`, never a copy of it here."""

    architecture: str
    num_classes: int = 2
    head: HeadKind = "linear"
    head_hidden: int = 256
    dropout: float = 0.2
    members: int = 1
    """More than one: an :class:`Ensemble` of that many models."""
    member_architectures: tuple[str, ...] = ()
    """Each member's architecture when they differ (the first is ``architecture``); empty: every
    member is an ``architecture``."""

    def __post_init__(self) -> None:
        archs = self.member_architectures
        if archs and (len(archs) != self.members or archs[0] != self.architecture):
            raise CatsdogsError(
                f"member architectures {list(archs)} do not fit an ensemble of {self.members} "
                f"whose first member is {self.architecture}"
            )

    def member(self, index: int) -> ModelSpec:
        """The spec of one member of the ensemble (the model itself when it has one member)."""
        if not 0 <= index < self.members:
            raise CatsdogsError(f"member {index} of an ensemble of {self.members}")
        arch = self.member_architectures[index] if self.member_architectures else self.architecture
        return replace(self, architecture=arch, members=1, member_architectures=())

    def to_dict(self) -> dict[str, object]:
        return {
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "head": self.head,
            "head_hidden": self.head_hidden,
            "dropout": self.dropout,
            "members": self.members,
            "member_architectures": list(self.member_architectures),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelSpec:
        fields = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        fields["member_architectures"] = tuple(fields.get("member_architectures") or ())  # type: ignore[arg-type]
        return cls(**fields)  # type: ignore[arg-type]


def build_model(spec: ModelSpec, config: PreprocessConfig, *, pretrained: bool = True) -> nn.Module:
    """Build the classifier for the inputs ``config`` describes; ``pretrained=False`` when weights will
    come from a bundle anyway."""
    check_architecture(spec.architecture)
    if spec.members != 1:  # Ensemble refuses fewer than one member
        members = range(spec.members)
        return Ensemble([build_model(spec.member(i), config, pretrained=pretrained) for i in members])
    if spec.architecture == "simple_cnn":
        return SimpleCNN(num_classes=spec.num_classes, dropout=spec.dropout)
    backbone = LiteFeatures(spec.architecture, image_size=config.image_size, pretrained=pretrained)
    head = build_head(
        spec.head,
        in_features=BACKBONES[spec.architecture].feature_dim,
        num_classes=spec.num_classes,
        hidden=spec.head_hidden,
        dropout=spec.dropout,
    )
    return TransferClassifier(backbone, head)


def load_model(bundle: ModelBundle) -> nn.Module:
    """Rebuild a bundle's model in eval mode: architecture from ``metadata.json``, input size from
    ``preprocessing.json``, weights from ``weights.pt`` (``weights_only=True``: no pickled code runs)."""
    from catsdogs.bundle import WEIGHTS

    model = build_model(ModelSpec.from_dict(bundle.metadata), bundle.preprocessing, pretrained=False)
    state = torch.load(bundle.path(WEIGHTS), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
