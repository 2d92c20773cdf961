"""The synthetic demo set is deterministic and laid out like the real one."""

from pathlib import Path

import numpy as np
import pytest

from brainmri import CLASS_NAMES
from brainmri.demo_data import generate_demo_dataset, synthetic_slice


def test_layout_and_counts(tmp_path: Path) -> None:
    counts = generate_demo_dataset(tmp_path, per_class=3, size=32, progress=False)
    assert counts == dict.fromkeys(CLASS_NAMES, 3)
    for label in CLASS_NAMES:
        assert len(list((tmp_path / label).glob("*.png"))) == 3


def test_deterministic_for_a_seed() -> None:
    a = synthetic_slice("glioma", np.random.default_rng(5), 32)
    b = synthetic_slice("glioma", np.random.default_rng(5), 32)
    assert np.array_equal(a, b) and a.dtype == np.uint8


def test_unknown_class_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        synthetic_slice("astrocytoma", np.random.default_rng(0), 32)
