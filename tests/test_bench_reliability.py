"""The reliability catalogue names tests that exist, and its JUnit reading folds parameters."""

import ast
from pathlib import Path

import pytest

from benchmarks import bench_reliability

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def test_every_fault_names_a_test_that_exists() -> None:
    for item in bench_reliability.FAULTS:
        path, name = item.test.split("::")
        tree = ast.parse((REPO / path).read_text())
        functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in functions, item.test
    assert len({item.test for item in bench_reliability.FAULTS}) == len(bench_reliability.FAULTS)


def test_outcomes_fold_parameters_and_keep_the_worst(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_x[1]" time="1.5"/>'
        '<testcase classname="tests.test_a" name="test_x[2]" time="0.5"><failure/></testcase>'
        '<testcase classname="tests.test_a" name="test_y" time="2"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    results = bench_reliability.outcomes(junit)
    assert results == {
        "tests/test_a.py::test_x": ("failed", 2.0),
        "tests/test_a.py::test_y": ("skipped", 2.0),
    }
    table = bench_reliability.markdown()
    assert table.count("\n") == len(bench_reliability.FAULTS) + 1
