"""The generated non-MRI set: every kind, deterministic, decodable the way the server decodes."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from brainmri.images import decode_image
from brainmri.non_mri import KINDS, generate_non_mri_set, main, non_mri_batch

pytestmark = pytest.mark.unit


def digests(written: dict[str, list[Path]]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for paths in written.values() for p in paths]


def test_every_kind_is_written_decodable_and_distinct(tmp_path: Path) -> None:
    written = generate_non_mri_set(tmp_path, per_kind=4, size=64)
    assert list(written) == list(KINDS) and all(len(p) == 4 for p in written.values())
    for path in (p for paths in written.values() for p in paths):
        image = decode_image(path)
        assert image.size == (64, 64) and image.mode == "RGB", path
    assert len(set(digests(written))) == 4 * len(KINDS)  # no two images alike
    grey_photo = np.asarray(decode_image(written["photo"][1]))
    assert (grey_photo[..., 0] == grey_photo[..., 2]).all()  # the hard case: a grey photo
    assert np.asarray(decode_image(written["blank"][0])).max() == 0  # black page


def test_the_set_is_the_same_for_a_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    first = digests(generate_non_mri_set(tmp_path / "a", per_kind=2, size=48))
    assert first == digests(generate_non_mri_set(tmp_path / "b", per_kind=2, size=48))
    other = digests(generate_non_mri_set(tmp_path / "c", per_kind=2, size=48, seed=1))
    assert first != other


def test_the_command_line_writes_the_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path), "--per-kind", "1", "--size", "32"]) == 0
    assert len(list(tmp_path.rglob("*.png"))) == len(KINDS)
    assert "wrote 6 images" in capsys.readouterr().out


def test_the_batch_is_the_set_at_a_models_input_size() -> None:
    from brainmri.images import PreprocessConfig

    images, kinds = non_mri_batch(PreprocessConfig(image_size=40), per_kind=2, seed=3)
    assert images.shape == (2 * len(KINDS), 3, 40, 40) and images.dtype.is_floating_point is False
    assert kinds == [kind for kind in KINDS for _ in range(2)]
