"""``catsdogs train``, ``evaluate`` and ``export``: the torch side, imported only when they run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from catsdogs.cli.common import DataDirOption, ModelUriOption, console
from catsdogs.settings import get_settings

app = typer.Typer()

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="efficientnet_lite0|1|2 (pretrained) or simple_cnn; several, comma-separated, "
        "train an ensemble of one model each.",
    ),
]
StrategyOption = Annotated[
    str | None,
    typer.Option(help="finetune (default: last blocks on cached activations) or head (frozen backbone)."),
]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        help="default, or best (three models, 14 blocks fine-tuned on random augmentations; ~1 h). "
        "Flags given with it win over its settings."
    ),
]
FinetuneBlocksOption = Annotated[
    int | None, typer.Option(min=0, help="finetune: how many of the last backbone blocks to train.")
]
HeadOption = Annotated[str | None, typer.Option(help="Head on the features: linear or mlp.")]
MembersOption = Annotated[
    int | None,
    typer.Option(min=1, max=8, help="Train an ensemble of this many models (seeds seed, seed+1, ...)."),
]
ImageSizeOption = Annotated[
    int | None, typer.Option(min=32, help="Input size (default: the backbone's; 280 for Lite2).")
]
EpochsOption = Annotated[
    int | None, typer.Option(min=1, help="Most epochs (default: 1 for finetune, 30 for head).")
]
ScheduleEpochsOption = Annotated[
    int | None,
    typer.Option(min=1, help="Epochs the LR schedule spans (default: --epochs); more stops before its tail."),
]
TimeBudgetOption = Annotated[
    float | None,
    typer.Option(
        min=0.1,
        help="Minutes of training: no epoch is started that would end later (each run "
        "trains at least one per model; export and test come after).",
    ),
]
TrainImagesOption = Annotated[int | None, typer.Option(min=1, help="Cap on training images.")]
EvalImagesOption = Annotated[int | None, typer.Option(min=1, help="Cap on val and test images.")]
RunNameOption = Annotated[str | None, typer.Option(help="Folder under runs_dir for this run.")]
DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu or cuda.")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")]
TrackOption = Annotated[
    bool, typer.Option("--track/--no-track", help="Log to MLflow and register the model.")
]


@app.command("train")
def train_command(
    model: ModelOption = None,
    strategy: StrategyOption = None,
    profile: ProfileOption = None,
    finetune_blocks: FinetuneBlocksOption = None,
    head: HeadOption = None,
    members: MembersOption = None,
    image_size: ImageSizeOption = None,
    epochs: EpochsOption = None,
    lr_schedule_epochs: ScheduleEpochsOption = None,
    time_budget: TimeBudgetOption = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", min=0.0)] = None,
    max_train_images: TrainImagesOption = None,
    max_eval_images: EvalImagesOption = None,
    run_name: RunNameOption = None,
    data_dir: DataDirOption = None,
    runs_dir: Annotated[Path | None, typer.Option()] = None,
    cache_dir: Annotated[Path | None, typer.Option()] = None,
    device: DeviceOption = None,
    resume: ResumeOption = False,
    track: TrackOption = True,
) -> None:
    """Train a model, write its bundle (ONNX, test metrics, drift reference), log it to MLflow and
    register it as the new `challenger`."""
    from catsdogs.training.workflow import train_and_register

    archs = [name.strip() for name in model.split(",")] if model else []
    settings = get_settings(
        architecture=archs[0] if archs else None,
        ensemble_architectures=archs if len(archs) > 1 else None,
        strategy=strategy, profile=profile, head=head, epochs=epochs,
        lr_schedule_epochs=lr_schedule_epochs, finetune_blocks=finetune_blocks, image_size=image_size,
        ensemble_members=members, time_budget_minutes=time_budget,
        batch_size=batch_size, learning_rate=learning_rate, max_train_images=max_train_images,
        max_eval_images=max_eval_images, run_name=run_name, data_dir=data_dir, runs_dir=runs_dir,
        cache_dir=cache_dir, device=device,
    )  # fmt: skip
    result, version = train_and_register(settings, resume=resume, track=track)
    if not result.test_metrics:  # a non-zero torchrun rank
        return
    low, high = result.test_metrics["accuracy_ci95"]
    typer.echo(
        f"bundle: {result.bundle_dir}\n"
        f"test accuracy: {result.test_metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, "
        f"n={result.test_metrics['n_images']})\n"
        f"epochs: {len(result.history)}, wall time: {result.elapsed_s:.0f} s"
    )
    if version is not None:
        typer.echo(f"registered {settings.model_name} v{version} as challenger; `catsdogs promote` next")


@app.command("evaluate")
def evaluate_command(
    model_uri: ModelUriOption,
    data: Annotated[Path, typer.Option("--data", help="Labelled folder, .zip archive or manifest.csv.")],
    split: Annotated[str | None, typer.Option(help="With a manifest: train, val or test.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Evaluate model.int8.onnx.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write metrics.json and predictions.csv here.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most this many images.")] = None,
) -> None:
    """Accuracy (95% Wilson CI), precision, recall, F1, log-loss, ROC-AUC and confusion matrix."""
    from catsdogs.training.evaluate import evaluate_bundle, resolve_model_uri

    bundle = resolve_model_uri(model_uri, settings=get_settings())
    result = evaluate_bundle(bundle, data, split=split, tta=tta, int8=int8, out_dir=out, limit=limit)
    typer.echo(json.dumps(result.metrics, indent=2))
    if result.skipped:
        console.print(f"skipped {len(result.skipped)} undecodable images", highlight=False)


@app.command("export")
def export_command(
    model_uri: ModelUriOption,
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write a statically quantized model.int8.onnx.")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Dataset for parity, INT8 calibration and accuracy checks.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the exported bundle here (a copy) instead of in place."),
    ] = None,
    log: Annotated[
        bool,
        typer.Option("--log/--no-log", help="Record the INT8 export on the bundle's MLflow training run."),
    ] = True,
) -> None:
    """Write the bundle's model.onnx (dynamic batch), checked against PyTorch on real images."""
    from catsdogs.training.evaluate import resolve_model_uri
    from catsdogs.training.export import export_bundle

    settings = get_settings(data_dir=data_dir)
    bundle = resolve_model_uri(model_uri, settings=settings)
    report = export_bundle(bundle, settings=settings, int8=int8, out=out)
    run_id = bundle.metadata.get("run_id")
    if log and int8 and run_id:
        from catsdogs.registry.tracking import log_export

        log_export(settings, run_id, int8_path=report.int8_path, int8=report.int8)
    typer.echo(
        json.dumps(
            {"onnx": str(report.onnx_path), "parity": report.parity.to_dict(), "int8": report.int8}, indent=2
        )
    )


@app.command("retrain")
def retrain_command(
    project: Annotated[
        Path | None, typer.Option(help="The DVC project (a checkout of this repository); default: here.")
    ] = None,
    pull: Annotated[
        str | None, typer.Option(help="Named DVC remote to restore the current data from first.")
    ] = None,
    push: Annotated[
        str | None, typer.Option(help="Named DVC remote to push the new data version to.")
    ] = None,
    commit: Annotated[
        bool, typer.Option("--commit", help="Commit dvc.lock (only it) as the retraining's git identity.")
    ] = False,
) -> None:
    """Retrain on new data: re-export the feedback, `dvc repro` (ingest, train: a new `challenger`,
    export, evaluate), optionally push the data and commit dvc.lock. `catsdogs promote` comes next."""
    from catsdogs.training.retrain import retrain

    settings = get_settings()
    result = retrain(settings, project=project, pull=pull, push=push, commit=commit,
                     echo=lambda line: typer.echo(line, err=True))  # fmt: skip
    before, after = result.data_version_before, result.data_version
    typer.echo(
        f"data version: {after} ({'changed from ' + str(before) if result.data_changed else 'unchanged'})"
    )
    if result.new_challenger:
        typer.echo(f"challenger: {settings.model_name} v{result.challenger} (new; `catsdogs promote` next)")
    else:
        typer.echo(
            f"challenger: {'v' + str(result.challenger) if result.challenger else 'none'} (no new one)"
        )
    if result.pushed_to:
        typer.echo(f"data pushed to DVC remote {result.pushed_to!r}")
    if commit:
        typer.echo(f"committed dvc.lock: {result.commit}" if result.commit else "nothing to commit")
