"""The one settings object.

Precedence, lowest to highest: field defaults < ``params.yaml`` < environment variables
(``CATSDOGS_*``) < keyword overrides (what the CLI passes from its flags). A training profile
(``--profile best``) sits between the last two: it replaces what the files and the environment
say, not what was given explicitly (:attr:`Settings.explicit`).

Nothing happens at import time: call :func:`get_settings` (or build :class:`Settings`) when needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

#: The public Microsoft download of the Kaggle cats-and-dogs archive ("PetImages" layout).
DEFAULT_DATA_SOURCE = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
    "kagglecatsanddogs_5340.zip"
)
#: Its published SHA-256 (824,887,076 bytes), the same in two independent places: the checksum
#: Hugging Face's ``cats_vs_dogs`` loader recorded for this URL (huggingface/datasets,
#: datasets/cats_vs_dogs/dataset_infos.json) and gomlx's dogsvscats example (DownloadChecksum).
#: It applies to this URL only: another source has no default checksum.
DEFAULT_DATA_SHA256 = "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9"
PARAMS_FILE_ENV = "CATSDOGS_PARAMS_FILE"


def _params_file() -> Path:
    return Path(os.environ.get(PARAMS_FILE_ENV, "params.yaml"))


class Settings(BaseSettings):
    """Every tunable of the project: paths, data, training, registry, serving."""

    model_config = SettingsConfigDict(
        env_prefix="CATSDOGS_",
        extra="ignore",
        validate_default=True,
        protected_namespaces=(),
    )
    _explicit: frozenset[str] = PrivateAttr(default_factory=frozenset)

    # --- paths -------------------------------------------------------------------------------
    data_dir: Path = Path("data")
    """Root of everything data: raw downloads, the normalized image store, manifest, report."""
    runs_dir: Path = Path("runs")
    """Training checkpoints and per-run outputs."""
    cache_dir: Path = Path(".cache/catsdogs")
    """Feature caches and downloaded model bundles."""

    # --- data --------------------------------------------------------------------------------
    data_source: str = DEFAULT_DATA_SOURCE
    data_sha256: str | None = None
    """Expected SHA-256 of the source archive; ``None`` means :data:`DEFAULT_DATA_SHA256` for the
    default source and no known checksum for any other (a download then needs ``--allow-unverified``)."""
    classes: tuple[str, ...] = ("cat", "dog")
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42
    min_image_side: int = 32
    max_image_pixels: int = 50_000_000
    """Bigger decoded images are refused (decompression-bomb guard); 48 MP phone photos pass."""
    store_max_side: int = 512
    """Images wider or taller than this are downscaled in the normalized store."""
    near_duplicate_distance: int = 4
    """Hamming distance (of 64-bit perceptual hashes) at or under which two images are near-duplicates."""
    max_image_bytes: int = 64 * 1024 * 1024
    """Files bigger than this are rejected by ingest before being read (a zip member can claim gigabytes)."""
    ingest_workers: int | None = None
    """Processes that decode and hash images during ingest; ``None`` means one per CPU core."""

    # --- training ----------------------------------------------------------------------------
    model_name: str = "catsdogs-classifier"
    """Registered model name in the MLflow model registry."""
    architecture: str = "efficientnet_lite2"
    strategy: Literal["head", "finetune", "scratch"] = "finetune"
    """``finetune`` (the default) trains the backbone's last blocks on cached activations; ``head``
    trains only a classifier on frozen features (faster; 13-14 validation errors of 2,077 against 10 for
    Lite2: README, "Per backbone and profile"); ``scratch`` is the ``simple_cnn`` baseline."""
    profile: Literal["default", "best"] = "default"
    image_size: int | None = None
    """Input size; ``None`` means the architecture's default: its pretraining size, except Lite2 at 280
    (better on validation than its native 260; 300 is better still but misses the serving p99
    target: README, "Per backbone and profile")."""
    batch_size: int = 64
    eval_batch_size: int = 16
    """Images per forward pass when validating. Small batches keep a Lite network's activations in
    the CPU's cache: Lite2 at 280 px validates real photos at 60.0 images/s in batches of 16, 29.8
    in batches of 128 (``benchmarks/bench_step.py --data-dir``; README, "Training")."""
    epochs: int | None = None
    """Most epochs to train (early stopping may end sooner); ``None`` means the strategy's own
    default (:data:`catsdogs.training.train.DEFAULT_EPOCHS`)."""
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    early_stopping_patience: int = 5
    prefetch_batches: int = Field(default=0, ge=0)
    """Batches of images decoded ahead in a background thread while the model steps (0: decode
    inline). Off by default: on this 2-core machine the thread competes with PyTorch's two and a
    step got slower, 0.96-0.98x (README, "Training"); for machines with a core to spare."""
    device: str = "auto"
    keep_freed_memory: bool = True
    """While training and validating, glibc's malloc keeps freed memory for reuse
    (:func:`catsdogs.training.loop.freed_memory_kept`): faster on CPU, at a higher peak memory (README,
    "Training"); false for a tight memory limit."""
    max_train_images: int | None = None
    """Cap on training images (for quick runs and tests); ``None`` uses the whole train split."""
    max_eval_images: int | None = None
    """Cap on validation and test images each (for quick runs and tests); ``None`` uses all."""
    head: Literal["linear", "mlp"] = "linear"
    """Classifier on the frozen features: logistic regression or a one-hidden-layer MLP."""
    head_hidden: int = 256
    head_dropout: float = 0.2
    flip_features: bool = False
    """Also train the head on the mirror image of every training image (a cached, fixed view).
    Off by default: on the validation split it gained nothing for Lite2 (98.80% either way,
    benchmarks/results/head_selection.json) and doubles the feature extraction time."""
    finetune_blocks: int = 2
    """``finetune``: how many of the backbone's last blocks are trained (with its head convolution)."""
    finetune_views: tuple[Literal["orig", "flip", "crop", "crop_flip"], ...] = ("orig", "flip")
    """``finetune``: the fixed views of each training image whose trunk activations are cached."""
    finetune_backbone_lr_scale: float = 0.1
    """``finetune``: the unfrozen blocks learn at this fraction of ``learning_rate`` (the head at all of
    it), so the pretrained weights move gently while the new head settles."""
    finetune_augment: bool = False
    """``finetune``: train on random augmentations (crop, mirror, colour jitter, rotation:
    :mod:`catsdogs.training.augment`) of every image, decoded each epoch and passed through the frozen trunk,
    instead of on cached fixed views. Each epoch costs a pass through the trunk, but sees new views,
    so it can train for several epochs (and deeper) without overfitting the views."""
    train_image_size: int | None = Field(default=None, ge=32)
    """Input size of the training images when they are decoded on the fly (``finetune_augment``,
    ``scratch``); ``None`` means ``image_size``. A smaller size trains faster, and a model trained on
    random-resized crops is more accurate served somewhat larger than it trained (Touvron et al.,
    2019, "FixRes"). Cached strategies refuse it."""
    train_bf16: bool = False
    """``finetune``: while training, run the frozen trunk and the trained blocks' 1x1 convolutions in
    bfloat16 (weights, gradients and optimizer stay float32; validation, export and serving float32).
    Faster where the CPU multiplies bfloat16 in hardware (AMX: README, "Training"), slower elsewhere."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Label smoothing of the training loss (validation loss stays plain cross-entropy)."""
    lr_schedule: Literal["cosine", "one_cycle"] = "cosine"
    """``cosine``: stepped once per epoch; ``one_cycle``: stepped every batch, warm-up over the first
    10% of the steps to ``learning_rate``, then cosine annealing (for runs of a few epochs)."""
    lr_schedule_epochs: int | None = Field(default=None, ge=1)
    """Epochs the learning-rate schedule spans; ``None`` means ``epochs``. Longer than ``epochs``,
    training ends while the rate is still falling, skipping the schedule's tail: with a weight
    average, the model kept was never from that tail (README, "Per backbone and profile")."""
    calibrate_temperature: bool = False
    """Fit one temperature on the validation split after training and fold it into the classifier's
    last layer, so the served probabilities are calibrated (label smoothing leaves them timid).
    Predictions do not change; probabilities and log-loss do."""
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Keep an exponential moving average of the weights, updated after every optimizer step with
    this decay; the average is what is validated, kept and served (the raw weights only train).
    ``None``: no average."""
    time_budget_minutes: float | None = Field(default=None, gt=0)
    """Minutes of training (from the start of ``catsdogs train`` to the end of the last epoch): an
    epoch that would end after them is not started, its length estimated from the slowest epoch so
    far. Each ensemble member gets an equal share of what is left when it starts, and every member
    trains at least one epoch. Writing the bundle and the test evaluation come after. A run then
    takes about as long on a slower CPU, with fewer epochs; ``None``: no limit."""
    ensemble_members: int = Field(default=1, ge=1, le=8)
    """Train this many models, each with its own seed (``seed``, ``seed + 1``, ...), and serve them
    as one graph that averages their probabilities. Averaging removes part of each model's own
    errors, at the price of training and serving time multiplied by the number of members."""
    ensemble_architectures: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """One architecture per ensemble member (``efficientnet_lite2,efficientnet_lite1``), in place of
    ``ensemble_members`` models of ``architecture``: members of different backbones share fewer
    errors than seeds of one. They train with the same strategy and serve at the same input size."""
    run_name: str | None = None
    """Folder under ``runs_dir`` for checkpoints and the bundle; default ``<architecture>-<strategy>``."""
    bundle_samples_per_class: int = 4
    """Labelled test images shipped in the bundle for smoke tests."""
    parity_images: int = 32
    """Validation images (besides the bundle samples) on which ONNX must match PyTorch."""
    int8_calibration_images: int = 256
    int8_max_accuracy_drop: float = 0.003
    """An INT8 model losing more validation accuracy than this (0.3 points) is refused."""

    # --- tracking and registry -----------------------------------------------------------------
    mlflow_tracking_uri: str = "sqlite:///mlruns.db"
    mlflow_registry_uri: str | None = None
    mlflow_experiment: str = "catsdogs"
    mlflow_artifact_location: str | None = None
    promotion_min_accuracy: float = 0.97
    promotion_min_class_recall: float = 0.95
    promotion_max_recall_drop: float = 0.01
    actor: str | None = None
    """Who is recorded on model alias changes (e.g. a CI bot's name); ``None`` means user@host."""

    # --- serving -----------------------------------------------------------------------------
    model_uri: str = "models:/catsdogs-classifier@champion"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    worker_start_wait_s: float = 60.0
    """With ``workers > 1``, how long a worker's startup waits for its first model before it
    accepts connections anyway. The workers share one socket, so a probe answered by a ready worker
    says nothing of the others: a worker that accepted while still loading would answer 503."""
    max_upload_bytes: int = 10 * 1024 * 1024
    max_batch_images: int = 32
    batch_max_size: int | None = None
    """Largest micro-batch; ``None`` picks per machine: 1 (no batching, the leanest path) on up to
    4 cores, where ORT's float32 per-image throughput does not grow with batch size, else 8. The
    INT8 graph gets 8 on any machine: its quantized kernels are ~10 % cheaper per image at batch 8,
    measured 5.9 vs 6.6 (Lite0) and 11.0 vs 11.7 (Lite2) server CPU-ms per request on 2 cores."""
    batch_max_wait_ms: float = 2.0
    queue_max: int = 256
    request_timeout_s: float = 10.0
    reload_interval_s: float = 30.0
    registry_timeout_s: float = 5.0
    ort_intra_threads: int | None = None
    """ORT intra-op threads per call; ``None``: cores / inference workers."""
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_token: SecretStr | None = None
    feedback_secret: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    store_uploads: bool = False
    log_level: str = "INFO"
    max_batch_upload_bytes: int = 64 * 1024 * 1024
    """Body limit of ``/predict/batch`` (each image still obeys ``max_upload_bytes``)."""
    decode_threads: int | None = None
    """Threads that decode uploads off the event loop; ``None`` means one per core."""
    inference_workers: int | None = None
    """Concurrent ONNX Runtime calls (each runs one micro-batch); ``None`` picks per machine: one per
    core without micro-batching (each call single-threaded: no intra-op synchronization, measured
    ~20 % more throughput on 2 cores), else 1 call on all cores."""
    ort_allow_spinning: bool = False
    """Let idle ORT threads spin: faster alone, but steals CPU from decoding on small machines."""
    ort_cpu_arena: bool = True
    """ORT's memory arena (grows to the largest batch run; batches are capped by ``batch_max_size``)."""
    decode_draft_factor: float = 2.0
    """JPEGs are DCT-decoded at no less than this × the model input size (0 turns the fast path off)."""
    serve_int8: bool = False
    """Serve ``model.int8.onnx`` from the bundle instead of the float32 graph."""
    drift_max_images_per_s: float = Field(default=20.0, ge=0)
    """Uploads per second (per worker) whose statistics feed drift detection once ``drift_window``
    uploads have filled the window (those are all fed); above that rate, evenly spaced ones are
    sampled (each costs ~0.8 ms of CPU, ~6 % of a Lite0 request). 0 feeds every upload."""
    upload_dir: Path = Path("uploads")
    """Where uploads are kept, only when ``store_uploads`` is on."""
    feedback_window: int = 500
    """Number of most recent feedback labels behind ``catsdogs_live_accuracy``."""
    feedback_max_age_s: float = 30 * 24 * 3600.0
    """Older prediction ids are refused by ``/feedback``."""
    graceful_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish."""

    # --- monitoring --------------------------------------------------------------------------
    drift_window: int = Field(default=500, ge=1)
    """Live images kept per drift feature (the sliding window behind ``catsdogs_drift_score``)."""
    drift_min_samples: int = Field(default=200, ge=1)
    """A drift feature gets a score only once its window holds this many images (PSI of fewer is noise)."""
    drift_reference_images: int = Field(default=1000, ge=50)
    """Training images whose statistics make the bundle's drift reference (600+ keeps PSI noise low)."""

    # --- deployment --------------------------------------------------------------------------
    deploy_namespace: str = "catsdogs"
    """Kubernetes namespace of the API (the overlays put everything there)."""
    deploy_deployment: str = "catsdogs-api"
    """Name of the API Deployment that `catsdogs deploy` rolls out and rolls back."""
    deploy_timeout_s: float = 300.0
    """How long to wait for a rollout before treating it as failed (and rolling back)."""
    kubectl: str = "kubectl"
    """The kubectl binary (a path, or a name on PATH)."""
    kube_context: str | None = None
    """kubeconfig context to use; ``None`` uses the current context."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: CLI overrides, then the environment, then params.yaml, then defaults.
        yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=_params_file())
        return (init_settings, env_settings, yaml_source, file_secret_settings)

    @field_validator("api_keys", "cors_origins", "ensemble_architectures", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # Accept "a,b" in an environment variable as well as a YAML/JSON list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if len(self.split_ratios) != 3 or abs(sum(self.split_ratios) - 1.0) > 1e-6:
            raise ValueError(f"split_ratios must be three numbers that sum to 1, got {self.split_ratios}")
        if any(r < 0 for r in self.split_ratios):
            raise ValueError("split_ratios must not be negative")
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError("classes must name at least two distinct classes")
        return self

    @property
    def explicit(self) -> frozenset[str]:
        """The fields given as keyword overrides to :func:`get_settings` (the CLI's flags): a
        profile leaves them alone, so ``--profile best --members 3`` trains three models."""
        return self._explicit

    # --- derived paths (pure, nothing is created here) -----------------------------------------
    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def manifest_path(self) -> Path:
        return self.data_dir / "manifest.csv"

    @property
    def report_path(self) -> Path:
        return self.data_dir / "data_report.json"


def get_settings(**overrides: Any) -> Settings:
    """Build the settings; ``None`` overrides are dropped so unset CLI flags keep lower layers."""
    given = {key: value for key, value in overrides.items() if value is not None}
    settings = Settings(**given)
    settings._explicit = frozenset(given)
    return settings
