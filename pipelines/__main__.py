"""Command line: ``python -m pipelines compile|local ...``."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from pipelines.pipeline import brain_mri_pipeline

DEFAULT_YAML = Path(__file__).with_name("brain_mri_pipeline.yaml")


def compile_pipeline(output: Path = DEFAULT_YAML) -> Path:
    """Compile the DAG to the YAML that the KFP UI and API accept."""
    from kfp import compiler

    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(brain_mri_pipeline, str(output))
    return output


def run_local(arguments: dict, pipeline_root: Path = Path("local_outputs")) -> None:
    """Run the real DAG in this Python environment with ``kfp.local``."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    brain_mri_pipeline(**arguments)


def _parameter_args(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per pipeline parameter, typed from the pipeline signature."""
    signature = inspect.signature(brain_mri_pipeline.pipeline_func)
    for name, param in signature.parameters.items():
        required = param.default is inspect.Parameter.empty
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=param.annotation,
            required=required,
            default=None if required else param.default,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    compile_cmd = commands.add_parser("compile", help="write the pipeline YAML for the KFP UI")
    compile_cmd.add_argument("--output", type=Path, default=DEFAULT_YAML)
    local_cmd = commands.add_parser("local", help="run the whole pipeline here with kfp.local")
    local_cmd.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"))
    _parameter_args(local_cmd)
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "compile":
        print(f"wrote {compile_pipeline(args['output'])}")
    elif command == "local":
        root = args.pop("pipeline_root")
        print(json.dumps(args, indent=2))
        run_local(args, root)


if __name__ == "__main__":
    main()
