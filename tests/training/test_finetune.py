"""Fine-tuning the last blocks on cached trunk activations: the split of the backbone is exact,
only the top learns, and the result is an ordinary bundle whose ONNX graph matches PyTorch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from catsdogs.bundle import ModelBundle
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.settings import Settings
from catsdogs.training.backbones import LiteFeatures, fold_symmetric_padding
from catsdogs.training.models import FinetuneTop, ModelSpec, build_model, load_model

pytestmark = pytest.mark.slow
SIZE_224 = PreprocessConfig(image_size=224)


@pytest.fixture(scope="module")
def lite0() -> LiteFeatures:
    return LiteFeatures("efficientnet_lite0", image_size=224).eval()


@pytest.mark.parametrize("stop", [0, 10, 15, 16])
def test_top_of_trunk_equals_the_whole_backbone(lite0: LiteFeatures, stop: int) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        np.testing.assert_allclose(
            lite0.top(lite0.trunk(x, stop=stop), start=stop).numpy(), lite0(x).numpy(), atol=1e-5
        )


@pytest.mark.parametrize("size", [224, 280])
def test_padding_moved_into_the_convolutions_computes_exactly_what_the_library_computes(size: int) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    library = EfficientNet.from_name("efficientnet-lite2", image_size=280).eval()
    folded = fold_symmetric_padding(copy.deepcopy(library))

    def pads(net):
        return sum(isinstance(getattr(m, "static_padding", None), torch.nn.ZeroPad2d) for m in net.modules())

    assert pads(library) == 22 and pads(folded) == 4  # only asymmetric stride-2 paddings are left
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        assert torch.equal(folded(x), library(x))  # the same arithmetic, not merely close
    assert folded.state_dict().keys() == library.state_dict().keys()


def test_only_the_last_blocks_the_head_conv_and_the_head_require_gradients() -> None:
    model = build_model(ModelSpec("efficientnet_lite0"), SIZE_224)
    top = FinetuneTop(model, blocks=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    allowed = ("head.", "backbone.net._blocks.14.", "backbone.net._blocks.15.",
               "backbone.net._conv_head.", "backbone.net._bn1.")  # fmt: skip
    assert trainable and all(name.startswith(allowed) for name in trainable)
    assert any(name.startswith("backbone.net._blocks.14.") for name in trainable)
    assert top.start == 14


def test_training_steps_leave_batch_norm_statistics_and_the_trunk_untouched() -> None:
    model = build_model(ModelSpec("efficientnet_lite0"), SIZE_224)
    top = FinetuneTop(model, blocks=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = top.param_groups(1e-2, backbone_lr_scale=0.1)
    optimizer = torch.optim.AdamW(groups)
    top.train()
    with torch.no_grad():
        activations = model.backbone.trunk(torch.randn(4, 3, 224, 224), stop=top.start)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(top(activations), torch.tensor([0, 1, 0, 1])).backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "head.1.weight" in changed and "backbone.net._conv_head.weight" in changed
    assert not any("running_" in k for k in changed)
    assert not any(k.startswith("backbone.net._blocks.") and not k.startswith("backbone.net._blocks.15.")
                   for k in changed)  # fmt: skip
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]


def test_from_images_the_frozen_trunk_runs_in_eval_mode_and_gets_no_gradient() -> None:
    model = build_model(ModelSpec("efficientnet_lite0"), SIZE_224)
    top = FinetuneTop(model, blocks=3, from_images=True).train()
    net = model.backbone.net
    assert not any(block.training for block in net._blocks[: top.start])
    assert all(block.training for block in net._blocks[top.start :])  # stochastic depth stays on
    images = torch.randn(2, 3, 192, 192)
    top(images).sum().backward()
    assert net._blocks[top.start]._project_conv.weight.grad is not None
    assert all(p.grad is None for p in net._blocks[top.start - 1].parameters())
    top.eval()
    with torch.inference_mode():
        torch.testing.assert_close(top(images), model(images))


def test_from_images_the_trunk_runs_with_batch_norm_folded_in_yet_computes_the_same() -> None:
    model = build_model(ModelSpec("efficientnet_lite0"), SIZE_224).eval()
    top = FinetuneTop(model, blocks=4, from_images=True)
    (fused,) = top._fused_trunk
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert top.state_dict().keys() == {f"model.{k}" for k in model.state_dict()}  # the copy is not saved
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(
            fused.trunk(images, stop=top.start),
            model.backbone.trunk(images, stop=top.start),
            atol=1e-4,
            rtol=1e-4,
        )
    top.double()
    assert next(fused.parameters()).dtype == torch.float64  # moved with the module


def test_the_trained_blocks_batch_norms_folded_into_their_convolutions_give_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("efficientnet_lite0"), SIZE_224)
    for module in model.modules():  # batch norms that are not the identity at initialisation
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.5, 0.5)
    folded = FinetuneTop(model, blocks=4, from_images=True).train()
    separate = FinetuneTop(copy.deepcopy(model), blocks=4, from_images=True, fold_batch_norms=False).train()
    images, labels = torch.randn(4, 3, 160, 160), torch.tensor([0, 1, 1, 0])
    for top in (folded, separate):
        torch.manual_seed(1)  # the same stochastic depth draws
        torch.nn.functional.cross_entropy(top(images), labels).backward()
    grads = {name: p.grad for name, p in separate.named_parameters() if p.grad is not None}
    assert any("_bn1.weight" in name for name in grads)  # the batch norms' affine parameters learn
    folded_grads = {name: p.grad for name, p in folded.named_parameters() if p.grad is not None}
    assert folded_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(folded_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)
    folded.eval(), separate.eval()
    with torch.inference_mode():
        torch.testing.assert_close(folded(images), separate(images), rtol=1e-4, atol=1e-5)


def test_bf16_trains_the_float32_weights_and_evaluates_exactly_in_float32() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("efficientnet_lite0"), SIZE_224)
    reference = copy.deepcopy(model).eval()
    top = FinetuneTop(model, blocks=3, from_images=True, bf16=True).train()
    assert len(top._fused_trunk) == 2 and next(top._fused_trunk[1].parameters()).dtype == torch.bfloat16
    assert top.state_dict().keys() == {f"model.{k}" for k in model.state_dict()}
    images = torch.randn(4, 3, 160, 160)
    float32 = FinetuneTop(copy.deepcopy(reference), blocks=3, from_images=True).train()
    torch.manual_seed(1)  # the same dropout and stochastic depth draws for both
    out = top(images)
    assert out.dtype == torch.float32
    torch.manual_seed(1)
    with torch.no_grad():  # rounded, not different: the same model up to bfloat16's precision
        torch.testing.assert_close(out, float32(images), atol=0.05, rtol=0.05)
    out.sum().backward()
    project = model.backbone.net._blocks[top.start]._project_conv
    assert project.weight.dtype == project.weight.grad.dtype == torch.float32
    average = copy.deepcopy(model).eval()  # what the moving average of the weights holds
    assert average.backbone.net._blocks[top.start]._project_conv.forward.__self__ is not project
    top.eval(), float32.eval()
    with torch.inference_mode():  # validation and export: float32 only
        assert torch.equal(top(images), float32(images))
        assert torch.equal(average(images), float32.model(images))


def test_more_blocks_than_the_backbone_has_are_refused() -> None:
    from catsdogs import CatsdogsError

    with pytest.raises(CatsdogsError, match="finetune_blocks must be between 0 and 16"):
        FinetuneTop(build_model(ModelSpec("efficientnet_lite0"), SIZE_224), blocks=17)


def _train_lite0(data_dir, cache_dir, tmp_path_factory, **settings):
    """The real ``train()``: Lite0 fine-tuned for two epochs on the small real dataset."""
    from catsdogs.training.train import train

    resolved = Settings(
        architecture="efficientnet_lite0", strategy="finetune", data_dir=data_dir, cache_dir=cache_dir,
        runs_dir=tmp_path_factory.mktemp("runs"), epochs=2, batch_size=32, **settings,
    )  # fmt: skip
    return train(resolved), resolved


@pytest.fixture(scope="module")
def finetune_run(isolated_env, small_data_dir, session_cache, tmp_path_factory):
    return _train_lite0(
        small_data_dir,
        session_cache,
        tmp_path_factory,
        finetune_blocks=1,
        finetune_views=("orig", "crop_flip"),
    )


def test_fine_tuning_learns_and_writes_a_bundle_whose_onnx_matches(finetune_run) -> None:
    result, _ = finetune_run
    assert result.params["strategy"] == "finetune" and result.params["finetune_blocks"] == 1
    assert result.params["finetune_views"] == ["orig", "crop_flip"]
    assert result.history[-1]["val_accuracy"] >= 0.9
    assert result.test_metrics["accuracy"] >= 0.9
    bundle = ModelBundle.open(result.bundle_dir)
    assert bundle.metadata["strategy"] == "finetune" and bundle.metadata["onnx"]["passed"]
    assert "training views: orig, crop_flip" in (result.bundle_dir / "model_card.md").read_text()
    model = load_model(bundle)
    pretrained = LiteFeatures("efficientnet_lite0", image_size=224)
    trained = model.backbone.net
    assert torch.equal(
        trained._blocks[0]._depthwise_conv.weight, pretrained.net._blocks[0]._depthwise_conv.weight
    )
    assert not torch.equal(
        trained._blocks[15]._project_conv.weight, pretrained.net._blocks[15]._project_conv.weight
    )


def test_a_second_run_reads_the_trunk_activations_from_the_cache(finetune_run, monkeypatch) -> None:
    from catsdogs.training import strategy_sources as sources
    from catsdogs.training.config import preprocess_config_for
    from catsdogs.training.features import read_manifest, split_samples
    from catsdogs.training.loop import Dist

    _, settings = finetune_run

    def refuse(*args, **kwargs):
        raise AssertionError("activations should come from the cache")

    monkeypatch.setattr(sources, "feature_extractor", lambda *a, **k: refuse)
    samples = read_manifest(settings.data_dir)
    train_src, val_src = sources.cached_sources(
        settings,
        preprocess_config_for(settings),
        split_samples(samples, "train"),
        split_samples(samples, "val"),
        Dist(),
        views=settings.finetune_views,
        stop=15,
    )
    x, _ = next(train_src.batches(4, rng=None, dist=Dist()))
    assert len(train_src) == 2 * 160 and len(val_src) == 40
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (192, 7, 7)  # block 15's input


@pytest.fixture(scope="module")
def augmented_run(isolated_env, small_data_dir, session_cache, tmp_path_factory):
    """Random augmentations through the frozen trunk, trained smaller than served and partly in
    bfloat16, calibrated, served as a moving average of the weights (a short one: 10 steps)."""
    return _train_lite0(
        small_data_dir, session_cache, tmp_path_factory, finetune_augment=True, finetune_blocks=3,
        image_size=224, train_image_size=176, label_smoothing=0.1, lr_schedule="one_cycle",
        calibrate_temperature=True, ema_decay=0.5, train_bf16=True,
    )  # fmt: skip


def test_fine_tuning_on_random_augmentations_learns_and_serves_at_its_own_size(augmented_run) -> None:
    result, _ = augmented_run
    assert result.params["finetune_augment"] and result.params["train_image_size"] == 176
    assert result.params["train_bf16"]  # and its ONNX graph, float32, matches PyTorch (below)
    assert result.history[-1]["val_accuracy"] >= 0.9 and result.test_metrics["accuracy"] >= 0.9
    bundle = ModelBundle.open(result.bundle_dir)
    assert bundle.preprocessing.image_size == 224 and bundle.metadata["onnx"]["passed"]
    assert bundle.metadata["ema_decay"] == 0.5 == result.params["ema_decay"]
    assert "training views: random augmentation" in (result.bundle_dir / "model_card.md").read_text()
    model = load_model(bundle)
    pretrained = LiteFeatures("efficientnet_lite0", image_size=224).net
    assert torch.equal(
        model.backbone.net._blocks[12]._project_conv.weight, pretrained._blocks[12]._project_conv.weight
    )
    assert not torch.equal(
        model.backbone.net._blocks[13]._project_conv.weight, pretrained._blocks[13]._project_conv.weight
    )


def test_the_calibrated_temperature_is_folded_into_the_served_model(augmented_run) -> None:
    from catsdogs.training.config import preprocess_config_for
    from catsdogs.training.features import read_manifest, split_samples
    from catsdogs.training.loop import validate
    from catsdogs.training.strategy_sources import image_sources

    result, settings = augmented_run
    bundle = ModelBundle.open(result.bundle_dir)
    temperature = bundle.metadata["temperature"]
    assert temperature == result.params["temperature"] and 0.05 < temperature < 20
    samples = read_manifest(settings.data_dir)
    _, val = image_sources(
        settings,
        preprocess_config_for(settings),
        split_samples(samples, "train"),
        split_samples(samples, "val"),
    )
    served = load_model(bundle)

    def fitted_temperature(model) -> float:
        row = validate(
            model,
            val,
            batch_size=64,
            device=torch.device("cpu"),
            class_names=settings.classes,
            calibrated=True,
        )
        return row["val_temperature"]

    # The served model needs no further temperature on validation ...
    assert fitted_temperature(served) == pytest.approx(1.0, rel=0.05)
    # ... and undoing the folded one gives back the model the temperature was fitted to.
    served.head[-1].weight.data.mul_(temperature)
    served.head[-1].bias.data.mul_(temperature)
    assert fitted_temperature(served) == pytest.approx(temperature, rel=0.05)
