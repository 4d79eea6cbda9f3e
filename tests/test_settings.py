"""Settings precedence: defaults < params.yaml < CATSDOGS_* environment < explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from catsdogs.settings import Settings, get_settings


def test_defaults_apply_without_any_source() -> None:
    s = Settings()
    assert s.split_ratios == (0.8, 0.1, 0.1)
    assert s.model_uri == "models:/catsdogs-classifier@champion"


def test_params_file_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("seed: 7\nbatch_size: 16\n")
    monkeypatch.setenv("CATSDOGS_PARAMS_FILE", str(params))
    s = Settings()
    assert (s.seed, s.batch_size) == (7, 16)


def test_environment_overrides_params_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("seed: 7\n")
    monkeypatch.setenv("CATSDOGS_PARAMS_FILE", str(params))
    monkeypatch.setenv("CATSDOGS_SEED", "9")
    assert Settings().seed == 9


def test_explicit_override_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATSDOGS_SEED", "9")
    assert get_settings(seed=11).seed == 11
    assert get_settings(seed=None).seed == 9  # an unset CLI flag keeps the lower layer


def test_comma_separated_lists_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATSDOGS_API_KEYS", "k1, k2")
    assert [key.get_secret_value() for key in Settings().api_keys] == ["k1", "k2"]


def test_split_ratios_must_sum_to_one() -> None:
    with pytest.raises(ValidationError, match="sum to 1"):
        Settings(split_ratios=(0.5, 0.2, 0.2))
