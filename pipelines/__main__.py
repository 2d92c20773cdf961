"""Command line: ``python -m pipelines compile|local|upload|run|schedule ...``.

compile   write the pipeline YAML (cluster options as flags: --gpu, --image, --s3-secret, ...)
local     run the whole DAG in this Python environment with kfp.local
upload    compile and upload as a new version of the pipeline on a KFP server
run       compile and start one run on a KFP server with the given parameters; prints its URL
schedule  a recurring run (cron) of the latest uploaded version, with the new-data check on
          (what the kfp CLI and kfp.Client cannot do: kubeflow/pipelines#11441)

Server commands read --host/--token/--namespace or KFP_HOST (or KF_PIPELINES_ENDPOINT),
KFP_TOKEN (or KFP_TOKEN_FILE) and KFP_NAMESPACE. To see what a server holds, use the kfp CLI
that comes with kfp: ``kfp --endpoint $KFP_HOST pipeline list`` (or ``run list``,
``recurring-run list``).

Every pipeline parameter is a flag; the ``train`` and ``augment`` parameters are one flag per
knob (``--epochs 20``, ``--gamma 0``), derived from TrainConfig and AugmentConfig.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from components.config import AugmentConfig, TrainConfig, add_flags, parse_bool, pop_flags, to_dict
from pipelines.cluster import (
    ClusterOptions,
    add_cluster_flags,
    cluster_flags_given,
    options_from_flags,
)
from pipelines.pipeline import PIPELINE_NAME, brain_mri_pipeline, build_pipeline

DEFAULT_YAML = Path(__file__).with_name("brain_mri_pipeline.yaml")
DEFAULT_EXPERIMENT = "brain-mri"
DEFAULT_SCHEDULE_NAME = f"{PIPELINE_NAME}-retrain"
DEFAULT_SERVICE_ACCOUNT = "pipeline-runner"  # manifests/base/rbac.yaml
# the pipeline parameters that are JSON objects, and the dataclass whose fields they hold
CONFIG_PARAMETERS: dict[str, Any] = {"train": TrainConfig(), "augment": AugmentConfig()}


def compile_pipeline(output: Path = DEFAULT_YAML, options: ClusterOptions | None = None) -> Path:
    """Compile the DAG for ``options`` to the YAML that the KFP UI and API accept."""
    from kfp import compiler

    output.parent.mkdir(parents=True, exist_ok=True)
    pipeline = brain_mri_pipeline if options is None else build_pipeline(options)
    compiler.Compiler().compile(pipeline, str(output))
    output.write_text(_stable_header(output.read_text()))
    return output


def _stable_header(text: str) -> str:
    """The compiled YAML with its header comment's object defaults in sorted key order.

    kfp writes a ``dict`` parameter's default into the ``# Inputs:`` comment in protobuf map
    order, which changes from one process to the next; sorted, the same pipeline compiles to
    the same bytes (the committed YAML is compared with a fresh compile).
    """
    import yaml

    parameters = next(yaml.safe_load_all(text))["root"]["inputDefinitions"]["parameters"]

    def sorted_default(match: re.Match[str]) -> str:
        default = dict(sorted(parameters[match["name"]]["defaultValue"].items()))
        return f"#    {match['name']}: dict [Default: {default}]"

    return re.sub(r"^#    (?P<name>\w+): dict \[Default: .*\]$", sorted_default, text, flags=re.M)


def run_local(arguments: dict, pipeline_root: Path = Path("local_outputs")) -> None:
    """Run the real DAG in this Python environment with ``kfp.local``.

    Object storage settings come from this process's environment, not from the cluster defaults.
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    build_pipeline(ClusterOptions.for_local())(**arguments)


# -- pipeline parameters as flags -----------------------------------------------------------------


def add_parameter_flags(parser: argparse.ArgumentParser, only_given: bool = False) -> None:
    """One ``--flag`` per pipeline parameter, typed from the pipeline signature, and one per knob
    of the ``train`` / ``augment`` objects.

    ``only_given``: optional parameters left out of the command line stay out of the result (a
    server run then uses the pipeline's own defaults).
    """
    group = parser.add_argument_group("pipeline parameters")
    signature = inspect.signature(brain_mri_pipeline.pipeline_func)
    for name, param in signature.parameters.items():
        if name in CONFIG_PARAMETERS:
            continue
        required = param.default is inspect.Parameter.empty
        kind = parse_bool if param.annotation is bool else param.annotation
        default = argparse.SUPPRESS if only_given else None if required else param.default
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            required=required,
            default=default,
            metavar=getattr(kind, "__name__", "VALUE").upper().lstrip("_"),
            help=None if required else f"default: {param.default}",
        )
    for name, base in CONFIG_PARAMETERS.items():
        add_flags(parser, base, f"the `{name}` parameter, one flag per key")


def parameters_from_flags(args: dict[str, Any], only_given: bool = False) -> dict[str, Any]:
    """The pipeline arguments in parsed ``args`` (knob flags folded into whole ``train`` and
    ``augment`` objects: always, or with ``only_given`` only when one of their knobs was given)."""
    for name, base in CONFIG_PARAMETERS.items():
        given = any(f.name in args for f in fields(base))
        config = pop_flags(args, base)
        if given or not only_given:
            args[name] = to_dict(config)
    return args


def _connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KFP server")
    group.add_argument("--host", help="KFP endpoint (default: $KFP_HOST or $KF_PIPELINES_ENDPOINT)")
    group.add_argument("--token", help="bearer token (default: $KFP_TOKEN)")
    group.add_argument("--token-file", help="file holding the bearer token ($KFP_TOKEN_FILE)")
    group.add_argument(
        "--kfp-namespace", help="Kubeflow profile namespace, multi-user installs ($KFP_NAMESPACE)"
    )
    group.add_argument("--ui-host", help="base URL of the KFP UI for links (default: --host)")
    group.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")


def _connection(args: dict[str, Any]):
    from pipelines.kfp_api import Connection

    return Connection.from_env(
        host=args.pop("host"),
        token=args.pop("token"),
        token_file=args.pop("token_file"),
        namespace=args.pop("kfp_namespace"),
        ui_host=args.pop("ui_host"),
        verify_ssl=not args.pop("insecure"),
    )


def _package(given: Path | None, args: dict[str, Any]) -> contextlib.AbstractContextManager[Path]:
    """The YAML to send: ``given``, or a fresh compile for the cluster flags, which it takes out
    of ``args`` now."""
    flags = cluster_flags_given(args)
    options = options_from_flags(args)
    if given is not None:
        if flags:
            raise ValueError(f"{', '.join(flags)} change a compile; they cannot change --package")
        return contextlib.nullcontext(given)
    return _compiled(options)


@contextlib.contextmanager
def _compiled(options: ClusterOptions) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield compile_pipeline(Path(tmp) / f"{PIPELINE_NAME}.yaml", options)


@contextlib.contextmanager
def _kfp_chatter_to_stderr() -> Iterator[None]:
    """kfp.Client prints its own links on stdout; keep stdout for this command's answer."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# -- commands -------------------------------------------------------------------------------------


def _cmd_compile(args: dict[str, Any]) -> None:
    output = args.pop("output")
    print(f"wrote {compile_pipeline(output, options_from_flags(args))}")


def _cmd_local(args: dict[str, Any]) -> None:
    root = args.pop("pipeline_root")
    arguments = parameters_from_flags(args)
    print(json.dumps(arguments, indent=2))
    run_local(arguments, root)


def _cmd_upload(args: dict[str, Any]) -> None:
    from pipelines import kfp_api

    connection = _connection(args)
    with _package(args.pop("package"), args) as package, _kfp_chatter_to_stderr():
        client = kfp_api.connect(connection)
        uploaded = kfp_api.upload(
            client,
            package,
            pipeline_name=args["pipeline_name"],
            version_name=args["version_name"],
            description=args["description"],
            namespace=connection.namespace,
        )
    what = "new pipeline" if uploaded.new_pipeline else "new version"
    print(
        f"{what}: pipeline {uploaded.pipeline_id}, version {uploaded.version_id} "
        f"({uploaded.version_name})"
    )
    print(
        connection.ui_url(f"pipelines/details/{uploaded.pipeline_id}/version/{uploaded.version_id}")
    )


def _cmd_run(args: dict[str, Any]) -> None:
    from pipelines import kfp_api

    connection = _connection(args)
    settings = {k: args.pop(k) for k in ("package", "experiment", "run_name", "service_account")}
    enable_caching = False if args.pop("no_cache") else None
    package_context = _package(settings["package"], args)  # takes the cluster flags out
    arguments = parameters_from_flags(args, only_given=True)
    with package_context as package, _kfp_chatter_to_stderr():
        run_id = kfp_api.submit_run(
            kfp_api.connect(connection),
            package,
            arguments,
            experiment=settings["experiment"],
            run_name=settings["run_name"],
            namespace=connection.namespace,
            service_account=settings["service_account"] or None,
            enable_caching=enable_caching,
        )
    print(f"run {run_id} with {json.dumps(arguments, sort_keys=True)}")
    print(connection.ui_url(f"runs/details/{run_id}"))


def _cmd_schedule(args: dict[str, Any]) -> None:
    from pipelines import kfp_api

    connection = _connection(args)
    names = ("cron", "name", "experiment", "service_account", "max_concurrency")
    names += ("replace", "upload", "pipeline_name", "pin_version")
    settings = {k: args.pop(k) for k in names}
    flags = cluster_flags_given(args)
    if flags and not settings["upload"]:
        raise kfp_api.KfpError(
            f"{', '.join(flags)} only apply with --upload: the schedule runs the latest "
            "uploaded version"
        )
    package_context = _package(None, args) if settings["upload"] else contextlib.nullcontext()
    arguments = parameters_from_flags(args, only_given=True)
    uploaded = None
    with package_context as package, _kfp_chatter_to_stderr():
        client = kfp_api.connect(connection)
        if package is not None:
            uploaded = kfp_api.upload(
                client, package, settings["pipeline_name"], namespace=connection.namespace
            )
        scheduled = kfp_api.schedule(
            client,
            pipeline_name=settings["pipeline_name"],
            cron=settings["cron"],
            arguments=arguments,
            experiment=settings["experiment"],
            name=settings["name"],
            namespace=connection.namespace,
            service_account=settings["service_account"] or None,
            max_concurrency=settings["max_concurrency"],
            replace=settings["replace"],
            pin_version=settings["pin_version"],
        )
    if uploaded is not None:
        print(f"uploaded version {uploaded.version_id} ({uploaded.version_name})")
    for warning in kfp_api.schedule_warnings(scheduled):
        print(warning, file=sys.stderr)
    if scheduled.replaced:
        print(f"replaced recurring run {scheduled.replaced}")
    version = (
        f"version {scheduled.pinned_version}" if scheduled.pinned_version else "the latest version"
    )
    print(
        f"recurring run {scheduled.recurring_run_id}: cron '{scheduled.cron}', {version} of "
        f"pipeline {scheduled.pipeline_id}, parameters "
        f"{json.dumps(scheduled.parameters, sort_keys=True)}"
    )
    print(connection.ui_url(f"recurringrun/details/{scheduled.recurring_run_id}"))


def build_parser() -> argparse.ArgumentParser:
    """Every command and its flags (long: one declaration per flag, read top to bottom)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        return commands.add_parser(name, allow_abbrev=False, help=help)

    compile_cmd = command("compile", "write the pipeline YAML for the KFP UI")
    compile_cmd.add_argument("--output", type=Path, default=DEFAULT_YAML)
    add_cluster_flags(compile_cmd)

    local_cmd = command("local", "run the whole pipeline here with kfp.local")
    local_cmd.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"))
    add_parameter_flags(local_cmd)

    upload_cmd = command("upload", "upload a new pipeline version")
    upload_cmd.add_argument("--pipeline-name", default=PIPELINE_NAME)
    upload_cmd.add_argument("--version-name", help="default: <UTC time>-<sha256 of the YAML>")
    upload_cmd.add_argument("--description")
    upload_cmd.add_argument(
        "--package", type=Path, help="upload this YAML instead of compiling (cluster flags unused)"
    )
    _connection_args(upload_cmd)
    add_cluster_flags(upload_cmd)

    run_cmd = command("run", "start one run on the server; prints its URL")
    run_cmd.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    run_cmd.add_argument("--run-name")
    run_cmd.add_argument(
        "--service-account",
        default=DEFAULT_SERVICE_ACCOUNT,
        help=f"default {DEFAULT_SERVICE_ACCOUNT} (manifests/base/rbac.yaml); '' for KFP's",
    )
    run_cmd.add_argument("--no-cache", action="store_true", help="run every step, cached or not")
    run_cmd.add_argument(
        "--package", type=Path, help="submit this YAML instead of compiling (cluster flags unused)"
    )
    _connection_args(run_cmd)
    add_cluster_flags(run_cmd)
    add_parameter_flags(run_cmd, only_given=True)

    schedule_cmd = command(
        "schedule", "recurring run of the latest pipeline version (new-data check on)"
    )
    schedule_cmd.add_argument(
        "--cron",
        required=True,
        help="6 fields with seconds ('0 0 3 * * *': 03:00 daily), 5 classic fields, or @daily",
    )
    schedule_cmd.add_argument("--name", default=DEFAULT_SCHEDULE_NAME)
    schedule_cmd.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    schedule_cmd.add_argument("--pipeline-name", default=PIPELINE_NAME)
    schedule_cmd.add_argument("--service-account", default=DEFAULT_SERVICE_ACCOUNT)
    schedule_cmd.add_argument("--max-concurrency", type=int, default=1)
    schedule_cmd.add_argument(
        "--replace", action="store_true", help="delete a recurring run of the same name first"
    )
    schedule_cmd.add_argument(
        "--upload", action="store_true", help="compile and upload a new version first"
    )
    schedule_cmd.add_argument(
        "--pin-version",
        action="store_true",
        help="run the version that is latest now, always (for KFP backends without "
        "'always use the latest version' support, before 2.5)",
    )
    _connection_args(schedule_cmd)
    add_cluster_flags(schedule_cmd)
    add_parameter_flags(schedule_cmd, only_given=True)
    return parser


COMMANDS = {
    "compile": _cmd_compile,
    "local": _cmd_local,
    "upload": _cmd_upload,
    "run": _cmd_run,
    "schedule": _cmd_schedule,
}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    try:
        COMMANDS[command](args)
    except Exception as error:  # noqa: BLE001 - turned into a one-line message below
        message = _describe(error)
        if message is None:
            raise
        parser.exit(2, f"{parser.prog} {command}: error: {message}\n")


def _describe(error: Exception) -> str | None:
    """A one-line message for the errors a user can fix; ``None`` for bugs (re-raised)."""
    import kfp_server_api
    import urllib3

    from pipelines.kfp_api import KfpError

    if isinstance(error, KfpError | ValueError | OSError):
        return str(error)
    if isinstance(error, kfp_server_api.ApiException):
        detail = error.body
        with contextlib.suppress(TypeError, ValueError):
            body = json.loads(error.body)
            detail = body.get("message") or body.get("error") or error.body
        hint = " (check --token / KFP_TOKEN)" if error.status in (401, 403) else ""
        return f"KFP API answered {error.status} {error.reason}: {detail}{hint}"
    if isinstance(error, urllib3.exceptions.HTTPError):
        return f"cannot reach the KFP API: {error}"
    return None


if __name__ == "__main__":
    main()
