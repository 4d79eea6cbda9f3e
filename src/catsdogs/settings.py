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

from catsdogs.access import is_loopback, signing_keys

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
    """Every tunable of the project: paths, data, training, registry, serving.

    Each field has a one-line help; why the defaults are what they are (with the measurements
    behind them) is in ``docs/experiments.md``, "Settings rationale".
    """

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
    """The data set to ingest: a zip archive, a folder or an http(s) URL."""
    data_sha256: str | None = None
    """Expected SHA-256 of the archive; ``None``: the default URL's (others need ``--allow-unverified``)."""
    classes: tuple[str, ...] = ("cat", "dog")
    """Class names, in the order of the model's outputs."""
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train, validation and test shares of the de-duplicated images (they sum to 1)."""
    seed: int = 42
    """Seed of the split, the shuffling, the augmentations and the initial weights."""
    min_image_side: int = 32
    """Images with a shorter side are refused (by ingest and by the service)."""
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
    """Backbone: ``efficientnet_lite0``/``1``/``2`` (pretrained) or ``simple_cnn`` (from scratch)."""
    strategy: Literal["head", "finetune", "scratch"] = "finetune"
    """``finetune``: last backbone blocks on cached activations; ``head``: frozen features; ``scratch``."""
    profile: Literal["default", "best"] = "default"
    """``best`` replaces the training settings not given explicitly by the best known recipe."""
    image_size: int | None = None
    """Input size; ``None`` means the architecture's default (its pretraining size; 280 for Lite2)."""
    batch_size: int = 64
    """Training images per optimizer step (split across ranks under torchrun)."""
    eval_batch_size: int = 16
    """Images per forward pass when validating (small batches keep activations in the CPU cache)."""
    epochs: int | None = None
    """Most epochs (early stopping may end sooner); ``None``: the strategy's ``DEFAULT_EPOCHS``."""
    learning_rate: float = 1e-3
    """AdamW's peak learning rate (the schedule's maximum)."""
    weight_decay: float = 1e-4
    """AdamW's decoupled weight decay."""
    early_stopping_patience: int = 5
    """Epochs without a better validation loss before training stops."""
    prefetch_batches: int = Field(default=0, ge=0)
    """Batches decoded ahead in a background thread while the model steps (0: decode inline)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    keep_freed_memory: bool = True
    """Keep freed memory in glibc's malloc while training (faster on CPU, higher peak memory)."""
    max_train_images: int | None = None
    """Cap on training images (for quick runs and tests); ``None`` uses the whole train split."""
    max_eval_images: int | None = None
    """Cap on validation and test images each (for quick runs and tests); ``None`` uses all."""
    head: Literal["linear", "mlp"] = "linear"
    """Classifier on the features: logistic regression or a one-hidden-layer MLP."""
    head_hidden: int = 256
    """Hidden units of the ``mlp`` head."""
    head_dropout: float = 0.2
    """Dropout before the head's linear layer(s)."""
    flip_features: bool = False
    """``head``: also train on the cached features of every training image's mirror image."""
    finetune_blocks: int = 2
    """``finetune``: how many of the backbone's last blocks are trained (with its head convolution)."""
    finetune_views: tuple[Literal["orig", "flip", "crop", "crop_flip"], ...] = ("orig", "flip")
    """``finetune``: the fixed views of each training image whose trunk activations are cached."""
    finetune_backbone_lr_scale: float = 0.1
    """``finetune``: the unfrozen blocks learn at this fraction of ``learning_rate`` (the head at all)."""
    finetune_augment: bool = False
    """``finetune``: train on random augmentations decoded each epoch instead of cached fixed views."""
    train_image_size: int | None = Field(default=None, ge=32)
    """Size of training images decoded on the fly (augmented, ``scratch``); ``None``: ``image_size``."""
    train_bf16: bool = False
    """``finetune``: run the frozen trunk and trained 1x1 convolutions in bfloat16 while training."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Label smoothing of the training loss (validation loss stays plain cross-entropy)."""
    lr_schedule: Literal["cosine", "one_cycle"] = "cosine"
    """``cosine``: stepped per epoch; ``one_cycle``: per batch, 10% warm-up, then cosine annealing."""
    lr_schedule_epochs: int | None = Field(default=None, ge=1)
    """Epochs the learning-rate schedule spans; ``None``: ``epochs`` (longer skips the schedule's tail)."""
    calibrate_temperature: bool = False
    """Fit a temperature on validation and fold it into the last layer (probabilities change, not labels)."""
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Decay of an exponential moving average of the weights, which is what is validated and kept."""
    time_budget_minutes: float | None = Field(default=None, gt=0)
    """Minutes of training: no epoch is started that would end later (each model trains at least one)."""
    ensemble_members: int = Field(default=1, ge=1, le=8)
    """Models trained with seeds ``seed``, ``seed + 1``, ... and served as one graph averaging them."""
    ensemble_architectures: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """One architecture per ensemble member (``efficientnet_lite2,efficientnet_lite1``)."""
    run_name: str | None = None
    """Folder under ``runs_dir`` for checkpoints and the bundle; default ``<architecture>-<strategy>``."""
    bundle_samples_per_class: int = 4
    """Labelled test images shipped in the bundle for smoke tests."""
    parity_images: int = 32
    """Validation images (besides the bundle samples) on which ONNX must match PyTorch."""
    int8_calibration_images: int = 256
    """Training images that calibrate the INT8 quantization."""
    int8_max_accuracy_drop: float = 0.003
    """An INT8 model losing more validation accuracy than this (0.3 points) is refused."""
    unknown_target_rate: float = Field(default=0.008, gt=0.0, lt=0.5)
    """Share of validation cats and dogs the unknown detector may call ``unknown`` (split between its
    two signals); 0.008 keeps the test split under 1% (docs/serving.md, "Not a cat or a dog")."""
    unknown_fit_images: int = Field(default=3000, ge=20)
    """Training images whose features fit the unknown detector's density."""
    unknown_components: int = Field(default=256, ge=1)
    """Main directions of that density's covariance (the rest share one variance)."""
    unknown_min_side: int = Field(default=64, ge=1)
    """Images smaller than this on a side are answered ``unknown`` (``min_image_side``: refused)."""
    unknown_flat_std: float = Field(default=0.02, ge=0.0)
    """Images whose every channel varies less than this (normalised units: 0.02 ≈ 2.5 of 255 levels)
    are answered ``unknown`` (blank, one colour)."""
    unknown_min_smoothness: float = Field(default=0.6, ge=0.0, le=1.0)
    """Images whose neighbouring pixels correlate less than this are answered ``unknown`` (noise;
    photos correlate at 0.89 or more)."""

    # --- tracking and registry -----------------------------------------------------------------
    mlflow_tracking_uri: str = "sqlite:///mlruns.db"
    """MLflow tracking store (a database URI or an http(s) tracking server)."""
    mlflow_registry_uri: str | None = None
    """MLflow model registry; ``None``: the tracking store."""
    mlflow_experiment: str = "catsdogs"
    """Experiment that training and ``evaluate-deployed`` runs are logged under."""
    mlflow_artifact_location: str | None = None
    """Artifact root of a newly created experiment; ``None``: MLflow's default."""
    promotion_min_accuracy: float = 0.97
    """The quality gate's floor on test accuracy."""
    promotion_min_class_recall: float = 0.95
    """The quality gate's floor on every class's test recall."""
    promotion_max_recall_drop: float = 0.01
    """How much lower than the champion's a class's recall may be."""
    promotion_max_unknown_rate: float = Field(default=0.02, ge=0.0, le=1.0)
    """The gate's ceiling on test cats and dogs answered ``unknown`` (gated apart from accuracy)."""
    actor: str | None = None
    """Who is recorded on model alias changes (e.g. a CI bot's name); ``None`` means user@host."""

    # --- scheduled retraining (`catsdogs retrain`) ----------------------------------------------
    retrain_git_name: str = "catsdogs-retrain-bot"
    """Author and committer of the dvc.lock commits ``catsdogs retrain --commit`` makes."""
    retrain_git_email: str = "catsdogs-retrain-bot@users.noreply.github.com"
    """E-mail address of that identity (GitHub's no-reply form: no mailbox is exposed)."""
    retrain_timeout_s: float = Field(default=12 * 3600.0, gt=0)
    """Longest one ``dvc repro`` (fetch to evaluate) of a retraining may run before it is stopped."""

    # --- serving -----------------------------------------------------------------------------
    model_uri: str = "models:/catsdogs-classifier@champion"
    """The served model: ``models:/name@alias``, ``models:/name/version`` or a bundle folder."""
    unknown_answers: bool = True
    """Answer ``unknown`` for uploads the model's detector finds are not cats or dogs (bundles with one)."""
    shadow_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of predictions also scored by the shadow model, off the request path; 0: no shadow."""
    shadow_model_uri: str = "models:/catsdogs-classifier@challenger"
    """The shadow model (a challenger proving itself on live traffic before ``promote``)."""
    shadow_max_cpu_share: float = Field(default=0.02, gt=0.0, le=1.0)
    """Most of the service's CPU (all its cores) the shadow may use; past it, samples are skipped."""
    host: str = "127.0.0.1"
    """Interface the service binds."""
    port: int = 8000
    """TCP port of the service."""
    workers: int = 1
    """Service worker processes (sharing one socket)."""
    worker_start_wait_s: float = 60.0
    """With ``workers > 1``, how long a worker waits for its first model before accepting connections."""
    max_upload_bytes: int = 10 * 1024 * 1024
    """Largest image accepted by ``/predict`` (413 above)."""
    max_decode_bytes: int = Field(default=192 * 1024 * 1024, ge=16 * 1024 * 1024)
    """Memory one image may take to decode and convert to RGB, estimated from its header (422 above)."""
    max_inflight_bytes: int = Field(default=128 * 1024 * 1024, ge=1024 * 1024)
    """Upload bytes a worker holds at once, reserved before bodies are read (503, or 413 if one is larger)."""
    upload_read_timeout_s: float = Field(default=60.0, gt=0)
    """A request body not fully received within this is answered 408."""
    max_connections: int = Field(default=200, ge=1)
    """Connections and requests a worker takes at once (uvicorn's ``limit_concurrency``; 503 above)."""
    max_batch_images: int = 32
    """Most images in one ``/predict/batch`` request."""
    batch_max_size: int | None = None
    """Largest micro-batch; ``None``: 1 on up to 4 cores (8 for the INT8 graph), else 8."""
    batch_max_wait_ms: float = 2.0
    """How long a micro-batch waits for more images before it runs."""
    queue_max: int = 256
    """Images admitted at once; more are refused at once with 503 and Retry-After."""
    request_timeout_s: float = 10.0
    """A prediction not answered within this is answered 504."""
    reload_interval_s: float = 30.0
    """How often the registry alias is polled for a new model version (0: only ``/admin/reload``)."""
    reload_backoff_max_s: float = 600.0
    """Longest wait between polls after failed loads (the wait doubles per failure from the interval)."""
    registry_timeout_s: float = 5.0
    """Bound on MLflow's HTTP retries; past it, the cached bundle of the last resolution is used."""
    ort_intra_threads: int | None = None
    """ORT intra-op threads per call; ``None``: cores / inference workers."""
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Keys accepted in ``X-API-Key`` or ``Authorization: Bearer`` (comma-separated in the environment)."""
    allow_anonymous: bool = False
    """Serve a non-loopback ``host`` without ``api_keys`` (refused unless this says so on purpose)."""
    rate_limit_per_minute: int = Field(default=1200, ge=0)
    """Requests per minute to /predict, /predict/batch and /feedback per API key (per client address
    without keys), for each pod; 0: no limit. Applies with API keys or a non-loopback ``host``."""
    rate_limit_burst: int = Field(default=200, ge=1)
    """Requests a caller may send at once before the per-minute rate applies (429 past it)."""
    rate_limit_store: Path | None = None
    """SQLite file the server's worker processes count requests in; ``None``: a fresh temporary one."""
    admin_token: SecretStr | None = None
    """Token of the ``/admin`` routes (``X-Admin-Token``); ``None``: those routes are not mounted."""
    feedback_secret: SecretStr | None = None
    """One key that signs prediction ids (key id derived from it); or use ``feedback_secrets``, not both."""
    feedback_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Prediction-id keys ``kid:secret`` (comma-separated): the first signs, every one verifies."""
    feedback_store_url: SecretStr | None = None
    """Feedback log's SQLAlchemy URL (PostgreSQL for several replicas); ``None``: SQLite in cache_dir."""
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Origins allowed by CORS (comma-separated in the environment); empty: no CORS headers."""
    store_uploads: bool = False
    """Keep every upload in ``upload_dir``."""
    log_level: str = "INFO"
    """Log level of the service (JSON lines)."""
    max_batch_upload_bytes: int = 64 * 1024 * 1024
    """Body limit of ``/predict/batch`` (each image still obeys ``max_upload_bytes``)."""
    decode_threads: int | None = None
    """Threads that decode uploads off the event loop; ``None`` means one per core."""
    inference_workers: int | None = None
    """Concurrent ONNX Runtime calls; ``None``: one per core without micro-batching, else 1 on all cores."""
    ort_lone_request_all_cores: bool = True
    """A request alone in its worker runs on every core (a second ORT session); under load each call
    keeps its share of the cores."""
    ort_allow_spinning: bool = False
    """Let idle ORT threads spin: faster alone, but steals CPU from decoding on small machines
    (the lone-request session always spins: the other cores are idle then)."""
    ort_cpu_arena: bool = True
    """ORT's memory arena (grows to the largest batch run; batches are capped by ``batch_max_size``)."""
    serve_int8: bool = False
    """Serve ``model.int8.onnx`` from the bundle instead of the float32 graph."""
    drift_max_images_per_s: float = Field(default=20.0, ge=0)
    """Uploads per second (per worker) sampled for drift once the window is full; 0 feeds every upload."""
    upload_dir: Path = Path("uploads")
    """Where uploads are kept, only when ``store_uploads`` is on."""
    feedback_window: int = 500
    """Number of most recent feedback labels behind ``catsdogs_live_accuracy``."""
    feedback_max_age_s: float = 30 * 24 * 3600.0
    """Older prediction ids are refused by ``/feedback``."""
    feedback_max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest ``/feedback`` body without an image; checked (with the API key) before it is read."""
    feedback_keep_images: bool = False
    """Keep the image sent with a ``/feedback`` label (EXIF-stripped) as training data."""
    feedback_image_retention_days: float = Field(default=30.0, gt=0)
    """Kept feedback images older than this are deleted from the feedback store."""
    graceful_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish."""

    # --- monitoring --------------------------------------------------------------------------
    drift_window: int = Field(default=500, ge=1)
    """Live images kept per drift feature (the sliding window behind ``catsdogs_drift_score``)."""
    drift_min_samples: int = Field(default=200, ge=1)
    """A drift feature gets a score only once its window holds this many images (PSI of fewer is noise)."""
    drift_reference_images: int = Field(default=1000, ge=50)
    """Training images whose statistics make the bundle's drift reference."""

    # --- rollback guard (`catsdogs guard`) ---------------------------------------------------------
    guard_min_labels: int = Field(default=200, ge=1)
    """Labelled predictions of the champion in the live-accuracy window (and in its own baseline)."""
    guard_max_drop: float = Field(default=0.05, gt=0.0, lt=1.0)
    """Live accuracy this far (a fraction: 0.05 = 5 points) below the baseline rolls the champion back."""
    guard_accuracy_floor: float | None = Field(default=None, gt=0.0, le=1.0)
    """Baseline for every champion instead of its own first ``guard_min_labels`` labels (wins when set)."""
    guard_cooldown_s: float = Field(default=3600.0, ge=0)
    """After an automatic rollback the guard acts again no sooner than this."""
    guard_interval_s: float = Field(default=60.0, gt=0)
    """How often the long-running guard checks live accuracy."""
    guard_webhook_token: SecretStr | None = None
    """Bearer token the guard's Alertmanager webhook requires (needed to bind a non-loopback host)."""
    guard_error_alerts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CatsdogsHighErrorRate"]
    )
    """Alert names (comma-separated in the environment) whose firing webhook rolls the champion back."""

    # --- batch scoring (`catsdogs predict-batch`) -------------------------------------------------
    predict_batch_size: int = Field(default=32, ge=1)
    """Images per ONNX Runtime call of a batch-scoring job (and per Ray Data batch)."""
    predict_workers: int | None = Field(default=None, ge=1)
    """Decode threads (local engine) or scoring actors (Ray); ``None``: one per available core."""

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

    @field_validator(
        "api_keys",
        "cors_origins",
        "ensemble_architectures",
        "feedback_secrets",
        "guard_error_alerts",
        mode="before",
    )
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
        if self.feedback_secret and self.feedback_secrets:
            raise ValueError(
                "set CATSDOGS_FEEDBACK_SECRETS (kid:secret,...) or CATSDOGS_FEEDBACK_SECRET, not both"
            )
        kids = [kid for kid, _ in self.feedback_keys]
        if len(set(kids)) != len(kids):
            raise ValueError(f"feedback_secrets has a key id twice: {kids}")
        return self

    @property
    def explicit(self) -> frozenset[str]:
        """The fields given as keyword overrides to :func:`get_settings` (the CLI's flags): a
        profile leaves them alone, so ``--profile best --members 3`` trains three models."""
        return self._explicit

    @property
    def loopback_only(self) -> bool:
        """``host`` is reachable from this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
        return is_loopback(self.host)

    @property
    def feedback_keys(self) -> list[tuple[str, str]]:
        """The prediction-id signing keys as ``(kid, secret)``, the signing one first; empty when none
        is set (:func:`catsdogs.access.signing_keys`)."""
        single = self.feedback_secret.get_secret_value() if self.feedback_secret else None
        return signing_keys(single, [entry.get_secret_value() for entry in self.feedback_secrets])

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
