"""Command line: ``python -m pipelines compile|local|upload|run|schedule|list ...``.

compile   write the pipeline YAML (cluster options as flags: --gpu, --image, --s3-secret, ...)
local     run the whole DAG in this Python environment with kfp.local
upload    compile and upload as a new version of the pipeline on a KFP server
run       compile and start one run on a KFP server with the given parameters; prints its URL
schedule  a recurring run (cron) of the latest uploaded version, with the new-data check on
list      pipelines, versions, runs or schedules on a KFP server

Server commands read --host/--token/--namespace or KFP_HOST (or KF_PIPELINES_ENDPOINT),
KFP_TOKEN (or KFP_TOKEN_FILE) and KFP_NAMESPACE.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.cluster import (
    ClusterOptions,
    Resources,
    parse_key_values,
    parse_toleration,
)
from pipelines.pipeline import PIPELINE_NAME, brain_mri_pipeline, build_pipeline

DEFAULT_YAML = Path(__file__).with_name("brain_mri_pipeline.yaml")
DEFAULT_EXPERIMENT = "brain-mri"
DEFAULT_SCHEDULE_NAME = f"{PIPELINE_NAME}-retrain"
DEFAULT_SERVICE_ACCOUNT = "pipeline-runner"  # manifests/base/rbac.yaml


def compile_pipeline(output: Path = DEFAULT_YAML, options: ClusterOptions | None = None) -> Path:
    """Compile the DAG for ``options`` to the YAML that the KFP UI and API accept."""
    from kfp import compiler

    output.parent.mkdir(parents=True, exist_ok=True)
    pipeline = brain_mri_pipeline if options is None else build_pipeline(options)
    compiler.Compiler().compile(pipeline, str(output))
    return output


def run_local(arguments: dict, pipeline_root: Path = Path("local_outputs")) -> None:
    """Run the real DAG in this Python environment with ``kfp.local``.

    Object storage settings come from this process's environment, not from the cluster defaults.
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    build_pipeline(ClusterOptions.for_local())(**arguments)


# -- flags ----------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parameter_args(parser: argparse.ArgumentParser, only_given: bool = False) -> None:
    """One ``--flag`` per pipeline parameter, typed from the pipeline signature.

    ``only_given``: optional parameters left out of the command line stay out of the result (a
    server run then uses the pipeline's own defaults).
    """
    group = parser.add_argument_group("pipeline parameters")
    signature = inspect.signature(brain_mri_pipeline.pipeline_func)
    for name, param in signature.parameters.items():
        required = param.default is inspect.Parameter.empty
        kind = _parse_bool if param.annotation in (bool, "bool") else param.annotation
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


_CLUSTER_FLAGS = {
    "image",
    "default_serving_image",
    "image_pull_policy",
    "gpu",
    "accelerator_type",
    "accelerator_limit",
    "node_selector",
    "toleration",
    "retries",
    "retry_backoff",
    "s3_secret",
    "s3_endpoint",
    "s3_https",
    "cache_ingest",
    "resources",
}


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    """Compile options (see pipelines/cluster.py); absent flags keep ClusterOptions' defaults."""
    defaults = ClusterOptions()
    group = parser.add_argument_group("cluster options (compile time)")
    add = group.add_argument
    s = argparse.SUPPRESS
    add("--image", default=s, help=f"component image (default {defaults.component_image})")
    add(
        "--default-serving-image",
        default=s,
        help=f"default of the serving_image parameter (default {defaults.serving_image})",
    )
    add("--image-pull-policy", default=s, choices=["Always", "IfNotPresent", "Never"])
    add(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="train on a GPU node (accelerator, node selector, tolerations; default: no)",
    )
    add("--accelerator-type", default=s, help=f"default {defaults.accelerator_type}")
    add("--accelerator-limit", type=int, default=s, help=f"default {defaults.accelerator_limit}")
    add(
        "--node-selector",
        action="append",
        default=s,
        metavar="KEY=VALUE",
        help="node label for the GPU step (repeat; replaces "
        f"{','.join(f'{k}={v}' for k, v in defaults.gpu_node_selector.items())})",
    )
    add(
        "--toleration",
        action="append",
        default=s,
        metavar="KEY[=VALUE][:EFFECT]",
        help="toleration for the GPU step (repeat; replaces nvidia.com/gpu:NoSchedule)",
    )
    add(
        "--retries",
        type=int,
        default=s,
        help=f"retries of the object-storage steps (default {defaults.retries}; 0: none)",
    )
    add(
        "--retry-backoff",
        default=s,
        help=f"first retry delay, doubled each time (default {defaults.retry_backoff})",
    )
    add(
        "--s3-secret",
        default=s,
        help=f"Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default "
        f"{defaults.s3_secret}; '' for none)",
    )
    add("--s3-endpoint", default=s, help=f"default {defaults.s3_endpoint}")
    add("--s3-https", action=argparse.BooleanOptionalAction, default=s, help="TLS to S3")
    add(
        "--cache-ingest",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="let KFP reuse a cached ingest (default: no; only for an immutable source prefix, "
        "never with the new-data check)",
    )
    add(
        "--resources",
        action="append",
        default=s,
        metavar="STEP:KEY=VALUE[,KEY=VALUE]",
        help="requests/limits of a step (repeat), KEY one of cpu_request, cpu_limit, "
        "memory_request, memory_limit: --resources train:memory_limit=32Gi,cpu_limit=16",
    )


def options_from_args(args: dict[str, Any]) -> ClusterOptions:
    """``ClusterOptions`` from the cluster flags present in ``args`` (popped from it)."""
    given = {key: args.pop(key) for key in list(args) if key in _CLUSTER_FLAGS}
    changes: dict[str, Any] = {}
    renames = {
        "image": "component_image",
        "default_serving_image": "serving_image",
        "image_pull_policy": "image_pull_policy",
        "gpu": "gpu",
        "accelerator_type": "accelerator_type",
        "accelerator_limit": "accelerator_limit",
        "retries": "retries",
        "retry_backoff": "retry_backoff",
        "s3_endpoint": "s3_endpoint",
        "s3_https": "s3_use_https",
        "cache_ingest": "cache_ingest",
    }
    for flag, field_name in renames.items():
        if flag in given:
            changes[field_name] = given[flag]
    if "s3_secret" in given:
        changes["s3_secret"] = given["s3_secret"] or None
    if "node_selector" in given:
        changes["gpu_node_selector"] = parse_key_values(given["node_selector"], "node selector")
    if "toleration" in given:
        changes["gpu_tolerations"] = tuple(parse_toleration(t) for t in given["toleration"])
    options = replace(ClusterOptions(), **changes)
    for item in given.get("resources", []):
        step, sep, pairs = item.partition(":")
        if not sep:
            raise ValueError(f"--resources {item!r}: expected STEP:KEY=VALUE[,KEY=VALUE]")
        values = parse_key_values(pairs.split(","), f"--resources {step}")
        unknown = set(values) - set(Resources.__dataclass_fields__)
        if unknown:
            raise ValueError(f"--resources {step}: unknown {', '.join(sorted(unknown))}")
        options = options.with_resources(step, **values)
    return options


def _connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KFP server")
    group.add_argument("--host", help="KFP endpoint (default: $KFP_HOST or $KF_PIPELINES_ENDPOINT)")
    group.add_argument("--token", help="bearer token (default: $KFP_TOKEN)")
    group.add_argument("--token-file", help="file holding the bearer token ($KFP_TOKEN_FILE)")
    group.add_argument(
        "--kfp-namespace",
        help="Kubeflow profile namespace, multi-user installs ($KFP_NAMESPACE)",
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


def _cluster_flags_given(args: dict[str, Any]) -> list[str]:
    return sorted(f"--{k.replace('_', '-')}" for k in args if k in _CLUSTER_FLAGS)


def _package(given: Path | None, args: dict[str, Any]) -> contextlib.AbstractContextManager[Path]:
    """The YAML to send: ``given``, or a fresh compile for the cluster flags, which it takes out
    of ``args`` now."""
    flags = _cluster_flags_given(args)
    options = options_from_args(args)
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


def _print_table(rows: list[dict[str, str]]) -> None:
    if not rows:
        print("(none)")
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


# -- commands -------------------------------------------------------------------------------------


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
    arguments = args  # what is left: the pipeline parameters given on the command line
    with package_context as package, _kfp_chatter_to_stderr():
        client = kfp_api.connect(connection)
        run_id = kfp_api.submit_run(
            client,
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
    settings = {
        k: args.pop(k)
        for k in (
            "cron",
            "name",
            "experiment",
            "service_account",
            "max_concurrency",
            "replace",
            "upload",
            "pipeline_name",
            "pin_version",
        )
    }
    flags = _cluster_flags_given(args)
    if flags and not settings["upload"]:
        raise kfp_api.KfpError(
            f"{', '.join(flags)} only apply with --upload: the schedule runs the latest "
            "uploaded version"
        )
    package_context = _package(None, args) if settings["upload"] else contextlib.nullcontext()
    arguments = args
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
    if kfp_api.NEW_DATA_CHECK not in scheduled.parameters:
        print(
            f"note: the pipeline has no `{kfp_api.NEW_DATA_CHECK}` parameter yet, so every "
            "scheduled run retrains",
            file=sys.stderr,
        )
    if "ingest" in kfp_api.cached_tasks(scheduled.version_spec):
        print(
            "warning: ingest is cached in the latest version (--cache-ingest): scheduled runs "
            "with the same `source` reuse the first dataset and never see new images; upload "
            "a version compiled without --cache-ingest",
            file=sys.stderr,
        )
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


def _cmd_list(args: dict[str, Any]) -> None:
    from pipelines import kfp_api

    connection = _connection(args)
    with _kfp_chatter_to_stderr():
        client = kfp_api.connect(connection)
        rows = kfp_api.list_rows(
            client, args["what"], args["pipeline_name"], connection.namespace, args["limit"]
        )
    _print_table(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    compile_cmd = commands.add_parser(
        "compile", allow_abbrev=False, help="write the pipeline YAML for the KFP UI"
    )
    compile_cmd.add_argument("--output", type=Path, default=DEFAULT_YAML)
    _cluster_args(compile_cmd)

    local_cmd = commands.add_parser(
        "local", allow_abbrev=False, help="run the whole pipeline here with kfp.local"
    )
    local_cmd.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"))
    _parameter_args(local_cmd)

    upload_cmd = commands.add_parser(
        "upload", allow_abbrev=False, help="upload a new pipeline version"
    )
    upload_cmd.add_argument("--pipeline-name", default=PIPELINE_NAME)
    upload_cmd.add_argument("--version-name", help="default: <UTC time>-<sha256 of the YAML>")
    upload_cmd.add_argument("--description")
    upload_cmd.add_argument(
        "--package", type=Path, help="upload this YAML instead of compiling (cluster flags unused)"
    )
    _connection_args(upload_cmd)
    _cluster_args(upload_cmd)

    run_cmd = commands.add_parser(
        "run", allow_abbrev=False, help="start one run on the server; prints its URL"
    )
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
    _cluster_args(run_cmd)
    _parameter_args(run_cmd, only_given=True)

    schedule_cmd = commands.add_parser(
        "schedule",
        allow_abbrev=False,
        help="recurring run of the latest pipeline version (new-data check on)",
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
    _cluster_args(schedule_cmd)
    _parameter_args(schedule_cmd, only_given=True)

    list_cmd = commands.add_parser(
        "list", allow_abbrev=False, help="pipelines, versions, runs or schedules"
    )
    list_cmd.add_argument(
        "what",
        nargs="?",
        default="pipelines",
        choices=("pipelines", "versions", "runs", "schedules"),
    )
    list_cmd.add_argument("--pipeline-name", default=PIPELINE_NAME, help="for `versions`")
    list_cmd.add_argument("--limit", type=int, default=20)
    _connection_args(list_cmd)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    try:
        if command == "compile":
            output = args.pop("output")
            print(f"wrote {compile_pipeline(output, options_from_args(args))}")
        elif command == "local":
            root = args.pop("pipeline_root")
            print(json.dumps(args, indent=2))
            run_local(args, root)
        else:
            {
                "upload": _cmd_upload,
                "run": _cmd_run,
                "schedule": _cmd_schedule,
                "list": _cmd_list,
            }[command](args)
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
