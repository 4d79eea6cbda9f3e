"""The one ONNX Runtime session factory: the graph contract, and the refusal of a graph whose input
size disagrees with the bundle's preprocessing.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from catsdogs import CatsdogsError
from catsdogs.preprocessing import PreprocessConfig
from catsdogs.runtime import (
    INPUT_NAME,
    OUTPUT_NAME,
    available_cores,
    cpu_quota,
    input_size,
    open_model,
    open_session,
    run_logits,
    session_options,
)
from fakes import WEIGHTS_A, tiny_onnx
from support import REPO


def test_input_size_reads_the_graphs_height_and_width(tmp_path: Path) -> None:
    assert input_size(open_session(tiny_onnx(tmp_path / "fixed.onnx", WEIGHTS_A, image_size=48))) == (48, 48)
    assert input_size(open_session(tiny_onnx(tmp_path / "any.onnx", WEIGHTS_A, image_size="S"))) is None


def test_a_graph_of_the_configured_size_opens_and_runs(tmp_path: Path) -> None:
    session = open_model(
        tiny_onnx(tmp_path / "m.onnx", WEIGHTS_A, image_size=32), PreprocessConfig(image_size=32)
    )
    logits = run_logits(session, np.zeros((3, 3, 32, 32), np.float32))
    assert logits.shape == (3, 2)


def test_a_graph_sized_unlike_preprocessing_json_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "m.onnx", WEIGHTS_A, image_size=224)
    with pytest.raises(CatsdogsError) as info:
        open_model(path, PreprocessConfig(image_size=280))
    message = str(info.value)
    assert "224x224" in message and "280x280" in message and str(path) in message
    assert "\n" not in message


def test_a_graph_with_symbolic_height_and_width_takes_the_configured_size(tmp_path: Path) -> None:
    session = open_model(
        tiny_onnx(tmp_path / "m.onnx", WEIGHTS_A, image_size="S"), PreprocessConfig(image_size=40)
    )
    assert run_logits(session, np.zeros((1, 3, 40, 40), np.float32)).shape == (1, 2)


def test_a_graph_without_the_tensor_names_of_the_contract_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["scores"])],
        "renamed",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "renamed.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(CatsdogsError, match=f"input {INPUT_NAME!r} and the output {OUTPUT_NAME!r}"):
        open_model(path, PreprocessConfig(image_size=8))


def test_session_options_carry_threads_spinning_and_arena() -> None:
    options = session_options(intra_threads=3, allow_spinning=False, cpu_arena=False)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.enable_cpu_mem_arena is False
    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_the_runtime_imports_neither_torch_nor_mlflow() -> None:
    code = (
        "import sys, catsdogs.runtime; "
        "print(sorted(m for m in ('torch', 'mlflow', 'pandas', 'sklearn') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src")},
        check=True,
    )
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("100000 100000", 1.0), ("150000 100000", 1.5), ("garbage", None), ("", None)],
)
def test_cpu_quota_reads_cgroup_cpu_max(tmp_path: Path, cpu_max: str, expected: float | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(f"{cpu_max}\n")
    assert cpu_quota(path) == expected


def test_thread_counts_follow_the_container_quota_not_the_node(tmp_path: Path) -> None:
    path = tmp_path / "cpu.max"
    unlimited = available_cores(cgroup_cpu_max=tmp_path / "absent")
    path.write_text("100000 100000\n")
    assert available_cores(cgroup_cpu_max=path) == 1
    path.write_text("150000 100000\n")
    assert available_cores(cgroup_cpu_max=path) == min(2, unlimited)
    path.write_text("max 100000\n")
    assert available_cores(cgroup_cpu_max=path) == unlimited
