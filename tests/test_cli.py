"""``python -m pipelines upload|run|schedule`` and the ``kfp`` CLI's listings: the real kfp.Client
against a fake KFP API.

No KFP API server can run here (it needs Kubernetes, Argo and MySQL), so ``tests/fake_kfp_api.py``
serves the v2beta1 REST endpoints on 127.0.0.1 and records what kfp.Client sent: the uploaded
YAML, the run and recurring-run bodies, the bearer token.
"""

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from components.config import TrainConfig, to_dict
from pipelines import kfp_api
from pipelines.__main__ import compile_pipeline, main
from pipelines.cluster import ClusterOptions
from tests.fake_kfp_api import FakeKfpApi

TOKEN = "test-token-123"
SOURCE = "s3://brain-data/training"


@pytest.fixture(autouse=True)
def clean_kfp_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No KFP settings from the developer's environment or ~/.config/kfp leak into a test."""
    import kfp.client.client

    monkeypatch.setattr(
        kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json")
    )
    for name in (
        "KFP_HOST",
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        "KFP_TOKEN",
        "KFP_TOKEN_FILE",
        "KFP_NAMESPACE",
        "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
        "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def api() -> Iterator[FakeKfpApi]:
    with FakeKfpApi(token=TOKEN) as fake:
        yield fake


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default cluster build, compiled once for the tests that do not test compile flags."""
    return compile_pipeline(tmp_path_factory.mktemp("pkg") / "brain_mri_pipeline.yaml")


def cli(api: FakeKfpApi, capsys: pytest.CaptureFixture, *argv: str) -> list[str]:
    """Run the command against ``api``; its stdout lines."""
    main([*argv, "--host", api.url, "--token", TOKEN])
    return capsys.readouterr().out.splitlines()


def cli_error(api: FakeKfpApi, capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run a command that must fail; its error message."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--host", api.url, "--token", TOKEN])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def tiny_package(path: Path, with_new_data_check: bool) -> Path:
    """A small pipeline with a ``source`` parameter, with or without ``skip_if_unchanged``."""

    @dsl.component(base_image="python:3.11-slim")
    def echo(text: str) -> str:
        return text

    if with_new_data_check:

        @dsl.pipeline(name="tiny")
        def tiny(source: str, skip_if_unchanged: bool = False) -> None:
            echo(text=source)

    else:

        @dsl.pipeline(name="tiny")
        def tiny(source: str) -> None:
            echo(text=source)

    compiler.Compiler().compile(tiny, str(path))
    return path


def test_upload_creates_the_pipeline_then_adds_versions(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, package: Path
) -> None:
    first = cli(api, capsys, "upload", "--package", str(package))
    second = cli(api, capsys, "upload", "--package", str(package))

    [create] = api.requests_to("POST", "/pipelines/upload")
    assert create.query["name"] == "brain-mri-classifier"
    filename, content = create.files["uploadfile"]
    assert filename.endswith(".yaml") and content == package.read_bytes()
    [version] = api.requests_to("POST", "/pipelines/upload_version")
    [pipeline_id] = api.pipelines
    assert version.query["pipelineid"] == pipeline_id
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", version.query["name"])
    assert version.files["uploadfile"][1] == package.read_bytes()
    assert first[0].startswith("new pipeline") and second[0].startswith("new version")
    newest = api.versions[pipeline_id][-1]["pipeline_version_id"]
    assert second[-1] == f"{api.url}/#/pipelines/details/{pipeline_id}/version/{newest}"
    assert {r.headers.get("authorization") for r in api.requests} == {f"Bearer {TOKEN}"}


def test_upload_compiles_with_the_cluster_flags(
    api: FakeKfpApi, capsys: pytest.CaptureFixture
) -> None:
    cli(
        api, capsys, "upload", "--gpu", "--image", "registry.example/components:9", "--retries", "5"
    )

    _, content = api.requests_to("POST", "/pipelines/upload")[0].files["uploadfile"]
    spec, platform = yaml.safe_load_all(content)
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {
        "registry.example/components:9"
    }
    assert executors["exec-train"]["container"]["resources"]["accelerator"]["resourceType"] == (
        "nvidia.com/gpu"
    )
    assert "exec-train" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert spec["root"]["dag"]["tasks"]["ingest"]["retryPolicy"]["maxRetryCount"] == 5


def test_run_sends_the_spec_and_only_the_given_parameters(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, package: Path
) -> None:
    out = cli(
        api,
        capsys,
        "run",
        "--package",
        str(package),
        "--source",
        SOURCE,
        "--epochs",
        "3",
        "--threshold",
        "0.5",
        "--run-name",
        "smoke",
    )

    [request] = api.requests_to("POST", "/runs")
    body = request.json
    train = to_dict(replace(TrainConfig(), epochs=3))  # the knob given, in the whole object
    assert body["runtime_config"]["parameters"] == {
        "source": SOURCE,
        "train": train,
        "threshold": 0.5,
    }
    assert body["display_name"] == "smoke"
    assert body["service_account"] == "pipeline-runner"
    documents = list(yaml.safe_load_all(package.read_text()))
    assert body["pipeline_spec"]["pipeline_spec"]["root"] == documents[0]["root"]
    assert body["pipeline_spec"]["platform_spec"] == documents[1]
    [experiment] = api.experiments.values()
    assert experiment["display_name"] == "brain-mri"
    assert body["experiment_id"] == experiment["experiment_id"]
    [run_id] = api.runs
    assert out[-1] == f"{api.url}/#/runs/details/{run_id}"  # the URL is the last line


def test_run_no_cache_turns_caching_off_for_every_step(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, package: Path
) -> None:
    cli(api, capsys, "run", "--package", str(package), "--source", SOURCE, "--no-cache")

    tasks = api.requests_to("POST", "/runs")[0].json["pipeline_spec"]["pipeline_spec"]["root"]
    assert not any(
        t.get("cachingOptions", {}).get("enableCache") for t in tasks["dag"]["tasks"].values()
    )


def test_schedule_runs_the_latest_version_with_the_new_data_check(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    old = tiny_package(tmp_path / "old.yaml", with_new_data_check=False)
    new = tiny_package(tmp_path / "new.yaml", with_new_data_check=True)
    cli(api, capsys, "upload", "--pipeline-name", "tiny", "--package", str(old))
    cli(api, capsys, "upload", "--pipeline-name", "tiny", "--package", str(new))

    out = cli(
        api,
        capsys,
        "schedule",
        "--pipeline-name",
        "tiny",
        "--cron",
        "0 3 * * *",
        "--source",
        SOURCE,
    )

    [request] = api.requests_to("POST", "/recurringruns")
    body = request.json
    [pipeline_id] = api.pipelines
    # a pipeline id and no version id: the server picks the latest version at every trigger
    assert body["pipeline_version_reference"] == {"pipeline_id": pipeline_id}
    assert "pipeline_spec" not in body
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["runtime_config"]["parameters"] == {"source": SOURCE, "skip_if_unchanged": True}
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True
    assert body["max_concurrency"] == 1
    assert body["service_account"] == "pipeline-runner"
    [recurring_id] = api.recurring_runs
    assert out[-1] == f"{api.url}/#/recurringrun/details/{recurring_id}"


def test_schedule_leaves_the_check_out_when_the_pipeline_has_none(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    package = tiny_package(tmp_path / "tiny.yaml", with_new_data_check=False)
    cli(api, capsys, "upload", "--pipeline-name", "tiny", "--package", str(package))

    main(
        [
            "schedule",
            "--pipeline-name",
            "tiny",
            "--cron",
            "@daily",
            "--source",
            SOURCE,
            "--host",
            api.url,
            "--token",
            TOKEN,
        ]
    )

    body = api.requests_to("POST", "/recurringruns")[0].json
    assert body["runtime_config"]["parameters"] == {"source": SOURCE}
    assert body["trigger"]["cron_schedule"]["cron"] == "@daily"
    assert "no `skip_if_unchanged` parameter" in capsys.readouterr().err


def test_schedule_refuses_a_duplicate_unless_replace(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, package: Path
) -> None:
    cli(api, capsys, "upload", "--package", str(package))
    schedule = ("schedule", "--cron", "0 0 3 * * *", "--source", SOURCE)
    cli(api, capsys, *schedule)
    [first] = api.recurring_runs

    assert "already exists" in cli_error(api, capsys, *schedule)
    out = cli(api, capsys, *schedule, "--replace")

    assert api.requests_to("DELETE", f"/recurringruns/{first}")
    [second] = api.recurring_runs
    assert second != first and f"replaced recurring run {first}" in out


def test_schedule_needs_an_uploaded_pipeline(
    api: FakeKfpApi, capsys: pytest.CaptureFixture
) -> None:
    message = cli_error(api, capsys, "schedule", "--cron", "0 0 3 * * *", "--source", SOURCE)
    assert "python -m pipelines upload" in message
    assert not api.requests_to("POST", "/recurringruns")


def test_schedule_takes_cluster_flags_only_with_upload(
    api: FakeKfpApi, capsys: pytest.CaptureFixture
) -> None:
    message = cli_error(api, capsys, "schedule", "--cron", "@daily", "--source", SOURCE, "--gpu")
    assert "--gpu" in message and "--upload" in message


def kfp_cli(api: FakeKfpApi, *argv: str) -> str:
    """The kfp package's own command line against ``api``; its output."""
    from click.testing import CliRunner
    from kfp.cli.cli import cli as kfp_command

    argv = ("--endpoint", api.url, "--existing-token", TOKEN, *argv)
    result = CliRunner().invoke(kfp_command, argv, obj={})  # kfp's own main passes obj={}
    assert result.exit_code == 0, result.output
    return result.output


def test_the_kfp_cli_lists_what_the_server_holds(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, package: Path
) -> None:
    """Listing is left to the kfp CLI (README): it works against what our commands created."""
    cli(api, capsys, "upload", "--package", str(package))
    cli(api, capsys, "run", "--package", str(package), "--source", SOURCE, "--run-name", "r1")
    cli(api, capsys, "schedule", "--cron", "@daily", "--source", SOURCE)

    assert "brain-mri-classifier" in kfp_cli(api, "pipeline", "list")
    assert "r1" in kfp_cli(api, "run", "list")
    assert "brain-mri-classifier-retrain" in kfp_cli(api, "recurring-run", "list")


def test_host_and_token_come_from_the_environment(
    api: FakeKfpApi,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    package: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("KFP_HOST", api.url)
    monkeypatch.setenv("KFP_TOKEN_FILE", str(token_file))

    main(["upload", "--package", str(package)])

    assert "new pipeline" in capsys.readouterr().out
    assert api.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"


def test_a_rejected_token_is_one_clear_error(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, package: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["upload", "--package", str(package), "--host", api.url, "--token", "wrong"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "401" in message and "--token" in message
    assert len(api.requests) == 1  # no retry loop


def test_no_host_is_an_error_that_says_how_to_get_one(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SystemExit):
        main(["upload", "--package", "pipeline.yaml"])
    assert "port-forward" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("0 3 * * *", "0 0 3 * * *"),
        ("0 0 3 * * 1-5", "0 0 3 * * 1-5"),
        ("@every 24h", "@every 24h"),
        ("  30   2 * * 0 ", "0 30 2 * * 0"),
    ],
)
def test_cron_expressions_are_sent_in_kfp_six_field_form(given: str, sent: str) -> None:
    assert kfp_api.normalize_cron(given) == sent


def test_a_malformed_cron_expression_is_refused() -> None:
    with pytest.raises(kfp_api.KfpError, match="6 fields"):
        kfp_api.normalize_cron("every night")


def test_schedule_arguments_respect_an_explicit_choice_and_reject_unknown_names() -> None:
    spec = {"pipeline_spec": {"root": {"inputDefinitions": {"parameters": {"source": {}}}}}}
    with_check = {
        "root": {"inputDefinitions": {"parameters": {"source": {}, "skip_if_unchanged": {}}}}
    }
    assert kfp_api.schedule_arguments(spec, {"source": SOURCE}) == {"source": SOURCE}
    assert kfp_api.schedule_arguments(with_check, {"skip_if_unchanged": False}) == {
        "skip_if_unchanged": False
    }
    with pytest.raises(kfp_api.KfpError, match="no parameter epochs"):
        kfp_api.schedule_arguments(spec, {"epochs": 3})


def test_cached_tasks_reads_the_compiled_caching_flags(package: Path) -> None:
    assert kfp_api.cached_tasks(kfp_api.read_package(package)) == ["split"]
    opted_in = compile_pipeline(package.with_name("cached.yaml"), ClusterOptions(cache_ingest=True))
    assert "ingest" in kfp_api.cached_tasks(kfp_api.read_package(opted_in))


def test_schedule_upload_compiles_uploads_and_schedules_in_one_go(
    api: FakeKfpApi, capsys: pytest.CaptureFixture
) -> None:
    out = cli(api, capsys, "schedule", "--upload", "--gpu", "--cron", "@daily", "--source", SOURCE)

    _, content = api.requests_to("POST", "/pipelines/upload")[0].files["uploadfile"]
    assert "nvidia.com/gpu" in content.decode()
    [pipeline_id] = api.pipelines
    body = api.requests_to("POST", "/recurringruns")[0].json
    assert body["pipeline_version_reference"] == {"pipeline_id": pipeline_id}
    assert out[0].startswith("uploaded version")


def test_cluster_flags_cannot_change_a_given_package(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, package: Path
) -> None:
    message = cli_error(api, capsys, "upload", "--package", str(package), "--gpu")
    assert "--gpu" in message and "--package" in message
    assert not api.requests


def test_schedule_can_pin_the_version_for_older_backends(
    api: FakeKfpApi, capsys: pytest.CaptureFixture, package: Path
) -> None:
    cli(api, capsys, "upload", "--package", str(package))
    out = cli(api, capsys, "schedule", "--pin-version", "--cron", "@daily", "--source", SOURCE)

    [pipeline_id] = api.pipelines
    [version] = api.versions[pipeline_id]
    reference = api.requests_to("POST", "/recurringruns")[0].json["pipeline_version_reference"]
    assert reference == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert f"version {version['pipeline_version_id']}" in out[-2]


def test_the_committed_generated_files_are_what_make_compile_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pipelines/brain_mri_pipeline.yaml`` (what the README uploads) keeps up with the code:
    a changed default or step without ``make compile`` fails here."""
    monkeypatch.delenv("COMPONENT_IMAGE", raising=False)
    fresh = compile_pipeline(tmp_path / "brain_mri_pipeline.yaml")
    committed = Path(__file__).resolve().parents[1] / "pipelines" / "brain_mri_pipeline.yaml"
    documents = [list(yaml.safe_load_all(path.read_text())) for path in (fresh, committed)]
    assert documents[0] == documents[1], "run `make compile` and commit the result"
