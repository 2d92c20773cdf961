"""The exported network and the runtimes that serve it: ONNX export checked, OpenVINO and ONNX
Runtime answering as eager PyTorch does (labels, probabilities, sets, OOD scores, maps), the
runtime chosen by name, and eager PyTorch when the bundle has no exported file."""

from pathlib import Path

import onnx
import pytest
import torch

from brainmri.backbones import get_backbone
from brainmri.model import ModelBundle, build_model
from brainmri.runtimes import ONNX_FILE, RUNTIMES, RuntimeUnavailable, load_runtime
from brainmri.trust import OODDetector, Trust
from serving.__main__ import build_parser, default_runtime

pytestmark = pytest.mark.unit
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle with flip averaging, a fitted-looking trust and its network as ONNX."""
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 4).eval()
    bundle = ModelBundle(
        model, "tiny_cnn", CLASSES, get_backbone("tiny_cnn").preprocess(48), test_time_flip=True
    )
    bundle.trust = Trust(temperature=0.7, set_quantile=0.6, ood=OODDetector("energy", 5.0))
    return bundle.save(tmp_path_factory.mktemp("exported") / "model", export=True)


def test_the_export_is_a_checked_onnx_graph_in_the_bundle(exported: Path) -> None:
    graph = onnx.load(exported / ONNX_FILE)
    onnx.checker.check_model(graph, full_check=True)
    assert [o.name for o in graph.graph.output] == ["logits", "feature_map"]
    assert ONNX_FILE in (exported / "checksums.json").read_text()  # verified on load
    intact = (exported / ONNX_FILE).read_bytes()
    (exported / ONNX_FILE).write_bytes(intact + b"x")
    with pytest.raises(ValueError, match="model.onnx does not match its checksum"):
        ModelBundle.load(exported)
    (exported / ONNX_FILE).write_bytes(intact)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_every_runtime_answers_as_eager_pytorch(exported: Path, runtime: str) -> None:
    eager, served = ModelBundle.load(exported), ModelBundle.load(exported, runtime=runtime)
    assert served.runtime_name == runtime
    batch = torch.randn(40, 3, 48, 48)
    ours, theirs = eager.forward(batch, maps=True), served.forward(batch, maps=True)
    assert torch.allclose(ours.probabilities(0.7), theirs.probabilities(0.7), atol=1e-5)
    assert torch.allclose(ours.maps, theirs.maps, atol=1e-4)
    a, b = eager.trust.assess(ours), served.trust.assess(theirs)
    assert torch.equal(a.predicted, b.predicted) and torch.equal(
        a.prediction_sets, b.prediction_sets
    )
    assert torch.allclose(a.ood_scores, b.ood_scores, atol=1e-4)


def test_a_bundle_without_its_export_is_served_eagerly(tmp_path: Path) -> None:
    model = build_model("tiny_cnn", 4)
    bundle = ModelBundle(model, "tiny_cnn", CLASSES, get_backbone("tiny_cnn").preprocess(32))
    bundle.save(tmp_path)
    with pytest.warns(UserWarning, match="model.onnx missing.*eager PyTorch"):
        loaded = ModelBundle.load(tmp_path, runtime="openvino")
    assert loaded.runtime_name == "torch" and loaded.predict_proba(
        torch.randn(2, 3, 32, 32)
    ).shape == (2, 4)


def test_runtimes_are_chosen_by_name(exported: Path) -> None:
    model = ModelBundle.load(exported).model
    exported_runtimes = [n for n in RUNTIMES if n != "openvino-int8"]
    assert {load_runtime(n, model, "tiny_cnn", exported).name for n in exported_runtimes} == set(
        exported_runtimes
    )
    with pytest.raises(RuntimeUnavailable, match="model-int8.xml missing"):
        load_runtime("openvino-int8", model, "tiny_cnn", exported)  # training kept none
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        load_runtime("tensorrt", model, "tiny_cnn", exported)
    parser = build_parser()
    assert parser.parse_args(["--model_dir", "/m"]).runtime is None  # the device decides:
    assert default_runtime(torch.device("cpu")) == "onnxruntime"  # measured fastest
    assert default_runtime(torch.device("cuda")) == "torch"  # the CPU runtimes cannot use it
    assert parser.parse_args(["--model_dir", "/m", "--runtime", "torch"]).runtime == "torch"


def test_openvino_runs_a_stream_per_concurrent_caller(exported: Path) -> None:
    """One OpenVINO stream serialises its callers: the server's forward workers each get one."""
    from concurrent.futures import ThreadPoolExecutor

    bundle = ModelBundle.load(exported, runtime="openvino", threads=1, streams=2)
    compiled = bundle.runtime.compiled
    assert compiled.get_property("NUM_STREAMS") == 2
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 2  # one thread per stream
    batches = [torch.randn(3, 3, 48, 48) for _ in range(8)]
    alone = [bundle.predict_proba(b) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(bundle.predict_proba, batches))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(alone, together, strict=True))


@pytest.mark.integration
def test_openvino_is_refused_not_crashed_under_a_preloaded_tcmalloc(exported: Path) -> None:
    """OpenVINO aborts the process under LD_PRELOAD=tcmalloc: the bundle falls back instead."""
    import ctypes.util
    import os
    import subprocess
    import sys

    from brainmri.cpu import TCMALLOC

    if ctypes.util.find_library("tcmalloc_minimal") is None:
        pytest.skip(f"{TCMALLOC} not installed (apt-get install libtcmalloc-minimal4)")
    code = (
        "import warnings; from brainmri.model import ModelBundle\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        f"    bundle = ModelBundle.load({str(exported)!r}, runtime='openvino')\n"
        "print(bundle.runtime_name, [str(w.message) for w in seen])\n"
    )
    env = {**os.environ, "LD_PRELOAD": TCMALLOC}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("torch") and "malloc is tcmalloc" in done.stdout
