"""The knobs' single schema: every field of TrainConfig and AugmentConfig reaches the pipeline
parameters (with its default and help), every command line, and the train step, with no edit
anywhere else; bad values are refused by name; compiling needs no ML stack."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import fields, replace

import pytest

from benchmarks import bench_accuracy
from components.config import (
    AugmentConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from pipelines import quickstart
from pipelines.__main__ import CONFIG_PARAMETERS, build_parser, parameters_from_flags
from pipelines.pipeline import brain_mri_pipeline, build_pipeline

CONFIGS = [("train", TrainConfig), ("augment", AugmentConfig)]


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


@pytest.mark.parametrize(("parameter", "cls"), CONFIGS)
def test_every_knob_is_in_the_pipeline_with_its_default_and_help(parameter: str, cls: type):
    spec = build_pipeline().component_spec.inputs[parameter]
    assert spec.default == to_dict(cls())  # the KFP UI shows every knob with its default
    description = brain_mri_pipeline.pipeline_spec.root.input_definitions.parameters[
        parameter
    ].description
    for item in fields(cls):
        assert item.metadata["help"], f"{cls.__name__}.{item.name} has no help"
        assert item.name in description


def another_value(default: object) -> tuple[str, object]:
    """A valid value other than ``default`` where one is easy to name: as typed, and as parsed."""
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):  # half of it stays inside every float knob's range
        other = default / 2 if default else 0.01
        return str(other), other
    return str(default), default  # a string knob's choices are its own; its default is valid


@pytest.mark.parametrize(("parameter", "cls"), CONFIGS)
@pytest.mark.parametrize("command", ["local", "run", "schedule"])
def test_every_knob_is_a_flag_of_the_pipeline_cli(parameter: str, cls: type, command: str):
    for item in fields(cls):
        text, expected = another_value(getattr(cls(), item.name))
        argv = [command, "--source", "s3://b/p", flag(item.name), text]
        if command == "schedule":
            argv += ["--cron", "@daily"]
        args = {
            key: value
            for key, value in vars(build_parser().parse_args(argv)).items()
            if key in {f.name for _, c in CONFIGS for f in fields(c)} | {"source"}
        }
        arguments = parameters_from_flags(args, only_given=command != "local")
        assert arguments[parameter][item.name] == expected, (command, item.name)


def test_given_knobs_fold_into_whole_objects_and_the_rest_stays_out() -> None:
    args = vars(build_parser().parse_args(["run", "--source", "s3://b/p", "--epochs", "3"]))
    for key in ("command", "host", "token", "token_file", "kfp_namespace", "ui_host", "insecure"):
        args.pop(key)
    for key in ("package", "experiment", "run_name", "service_account", "no_cache"):
        args.pop(key)
    assert parameters_from_flags(args, only_given=True) == {
        "source": "s3://b/p",
        "train": to_dict(replace(TrainConfig(), epochs=3)),
    }


def test_every_train_knob_is_a_flag_of_make_run_and_the_benchmark() -> None:
    for item in fields(TrainConfig):
        text, expected = another_value(getattr(TrainConfig(), item.name))
        demo = quickstart.training_config(quickstart.parse_args([flag(item.name), text]))
        bench = bench_accuracy.parse_args([flag(item.name), text]).train
        assert getattr(demo, item.name) == getattr(bench, item.name) == expected, item.name
    augment = bench_accuracy.parse_args(["--gamma", "0"]).augment
    assert augment == replace(AugmentConfig(), gamma=0.0)


def test_knob_names_collide_with_nothing() -> None:
    parameters = set(inspect.signature(brain_mri_pipeline.pipeline_func).parameters)
    train, augment = ({f.name for f in fields(cls)} for _, cls in CONFIGS)
    assert not train & augment
    assert not (train | augment) & (parameters - set(CONFIG_PARAMETERS))


def test_bad_values_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown AugmentConfig key\(s\) \['gama'\]"):
        from_dict(AugmentConfig, {"gama": 0.1})
    with pytest.raises(ValueError, match="TrainConfig.epochs must be int, got '14'"):
        from_dict(TrainConfig, {"epochs": "14"})
    with pytest.raises(ValueError, match="TrainConfig.pretrained must be bool, got 1"):
        TrainConfig(pretrained=1)
    with pytest.raises(ValueError, match="TrainConfig.epochs must be int, got 2.5"):
        TrainConfig(epochs=2.5)


def test_numbers_arrive_from_kfp_as_doubles_and_are_taken_back() -> None:
    """A KFP object parameter is a protobuf Struct: every number in it is a double."""
    config = from_dict(TrainConfig, {"epochs": 14.0, "image_size": 192.0, "learning_rate": 1})
    assert (config.epochs, config.image_size, config.learning_rate) == (14, 192, 1.0)
    assert type(config.epochs) is int and type(config.learning_rate) is float


@pytest.mark.integration
def test_the_pipeline_compiles_without_torch(tmp_path) -> None:
    """The recipe module and everything the DAG imports are free of the ML stack."""
    script = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'sklearn', 'efficientnet_lite_pytorch'):\n"
        "    sys.modules[name] = None  # any import of these now fails\n"
        "from pipelines.__main__ import compile_pipeline\n"
        f"compile_pipeline(__import__('pathlib').Path({str(tmp_path / 'p.yaml')!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.yaml").is_file()
