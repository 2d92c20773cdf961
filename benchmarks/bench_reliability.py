"""Reliability benchmark: every fault the project is proven against, injected by its test.

    python -m benchmarks.bench_reliability            # run the fault tests, write reliability.json
    python -m benchmarks.bench_reliability --markdown # print the README table from the catalogue

Each entry of :data:`FAULTS` names a fault, what the project does about it and the test that
injects it. The benchmark runs exactly those tests with pytest (real local S3 server, real model
server, kmock Kubernetes API, namespace-sandboxed containers), reads pytest's JUnit XML and
writes ``benchmarks/results/reliability.json``: per fault its outcome, test, pass/fail and
seconds; the counts; and the load test's figures from ``load.json`` (``make bench-load``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, write_json

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fault:
    area: str
    fault: str
    outcome: str
    test: str  # pytest node id, without parameters


FAULTS = [
    Fault(
        "rollout",
        "RawDeployment keeps Ready true from the old pods during a rolling update",
        "wait for the predictor to answer with the new model_version; on timeout roll back",
        "tests/test_rollout.py::test_stale_ready_is_not_trusted_and_the_timeout_rolls_back",
    ),
    Fault(
        "rollout",
        "canary percent on a RawDeployment (KServe ignores it)",
        "recorded as all traffic, no false timeout",
        "tests/test_rollout.py::test_a_canary_in_raw_mode_rolls_out_fully_without_a_false_timeout",
    ),
    Fault(
        "rollout",
        "serverless canary",
        "ready only when the latest ready revision carries the new spec and its traffic share",
        "tests/test_rollout.py::test_serverless_ready_means_a_new_ready_revision_with_its_share",
    ),
    Fault(
        "rollout",
        "the new model fails to load",
        "wait ends at once with the predictor's reason; rolled back",
        "tests/test_rollout.py::test_model_load_failures_end_the_wait",
    ),
    Fault(
        "rollout",
        "Kubernetes API errors while polling",
        "kept polling until the deadline",
        "tests/test_rollout.py::test_wait_keeps_polling_through_api_errors_until_the_deadline",
    ),
    Fault(
        "rollout",
        "another rollout changed the service meanwhile",
        "this rollout stops at once, its model not blamed; nothing restored over the other's spec",
        "tests/test_rollout.py::test_nothing_is_restored_over_another_rollouts_spec",
    ),
    Fault(
        "promote",
        "two promotes at once",
        "resourceVersion patches and a conditional record: the record names what serves",
        "tests/test_promote.py::test_two_promotions_at_once_leave_a_record_of_what_serves",
    ),
    Fault(
        "promote",
        "a retried promote after a failed rollout",
        "the rejected model is not rolled out again",
        "tests/test_promote.py::test_a_retried_promote_does_not_roll_the_same_bad_model_out_again",
    ),
    Fault(
        "promote",
        "production record corrupt while a service exists",
        "error naming the object; nothing promoted",
        "tests/test_promote.py::test_a_corrupt_production_record_stops_the_promotion_naming_it",
    ),
    Fault(
        "promote",
        "S3 server killed mid-upload",
        "no committed partial version; production unchanged",
        "tests/test_promote.py::test_killing_object_storage_mid_upload_commits_no_partial_version",
    ),
    Fault(
        "promote",
        "no cluster client inside a pod",
        "promote fails, record untouched",
        "tests/test_promote.py::test_unreachable_cluster_leaves_production_record_untouched",
    ),
    Fault(
        "gate",
        "production record missing, empty, corrupt or not an object while a service serves",
        "the gate fails closed naming the object",
        "tests/test_gate.py::test_the_gate_fails_closed_on_an_unreadable_record",
    ),
    Fault(
        "gate",
        "challenger better overall but worse on one class",
        "refused (max_recall_drop)",
        "tests/test_gate.py::test_better_overall_but_worse_on_one_class_is_refused",
    ),
    Fault(
        "training",
        "a retried task finds its PyTorchJob (409)",
        "adopts it (a failed one is replaced)",
        "tests/test_train_job.py::test_a_retried_task_adopts_its_running_job_and_replaces_a_failed_one",
    ),
    Fault(
        "training",
        "transient API error while polling the PyTorchJob",
        "polling goes on",
        "tests/test_train_job.py::test_polling_survives_a_transient_api_error",
    ),
    Fault(
        "training",
        "NaN/inf loss",
        "DivergedError before anything is saved",
        "tests/test_train_evaluate.py::test_a_nan_loss_stops_the_run_before_anything_is_saved",
    ),
    Fault(
        "training",
        "corrupt checkpoint",
        "warning, training restarts from scratch",
        "tests/test_train_evaluate.py::test_a_corrupt_checkpoint_restarts_training_with_a_warning",
    ),
    Fault(
        "storage",
        "S3 server restarted during ingest",
        "retries with backoff for S3_RETRY_S (60 s); the run completes",
        "tests/test_storage_faults.py::test_ingest_rides_out_a_restart",
    ),
    Fault(
        "storage",
        "S3 server restarted during a checkpoint upload",
        "retried; the checkpoint lands whole",
        "tests/test_storage_faults.py::test_a_checkpoint_upload_rides_out_a_restart",
    ),
    Fault(
        "storage",
        "S3 server restarted during promote",
        "retried; the version and record land whole",
        "tests/test_storage_faults.py::test_a_promote_rides_out_a_restart",
    ),
    Fault(
        "storage",
        "S3 unreachable, bucket missing, wrong credentials",
        "a clear error naming the endpoint or bucket and what to check",
        "tests/test_storage.py::test_unreachable_server_is_a_clear_error",
    ),
    Fault(
        "ingest",
        "object key with '..'",
        "error naming the key",
        "tests/test_ingest.py::test_an_object_key_with_dot_dot_is_an_error_naming_it",
    ),
    Fault(
        "ingest",
        "two source files mapping to one destination",
        "error naming both",
        "tests/test_ingest.py::test_two_files_mapping_to_one_destination_name_both",
    ),
    Fault(
        "ingest",
        "16-bit greyscale images",
        "stretched by their own range to 8 bits, not clipped",
        "tests/test_ingest.py::test_16_bit_images_are_scaled_by_their_range_not_clipped",
    ),
    Fault(
        "ingest",
        "images under 32 px; hidden files",
        "quarantined (too_small); hidden files listed in the report",
        "tests/test_ingest.py::test_tiny_images_are_quarantined_and_hidden_files_listed",
    ),
    Fault(
        "ingest",
        "a stray folder that is not a class",
        "quarantined and reported; an error with strict_class_folders",
        "tests/test_ingest.py::test_class_aliases_and_a_stray_folder",
    ),
    Fault(
        "ingest",
        "corrupt, truncated, zero-byte, non-image files",
        "quarantined and listed; the run fails above max_quarantine_fraction",
        "tests/test_ingest.py::test_bad_files_are_quarantined_not_dropped",
    ),
    Fault(
        "serving",
        "v2 FP32 with a -1 batch dimension",
        "400",
        "tests/test_serving_abuse.py::test_minus_one_batches_are_refused",
    ),
    Fault(
        "serving",
        "more requests than serving slots",
        "429 with Retry-After; liveness holds",
        "tests/test_serving_abuse.py::test_overload_is_shed_with_429_while_liveness_holds",
    ),
    Fault(
        "serving",
        "too many bytes in flight; slow uploads",
        "429 with Retry-After; a slow upload holds no slot",
        "tests/test_serving_abuse.py::test_the_byte_budget_sheds_and_a_slow_upload_holds_no_slot",
    ),
    Fault(
        "serving",
        "a body that never arrives; an oversize body",
        "408 after --body_timeout_s; 413 naming the limit (the body drained, no reset)",
        "tests/test_serving_abuse.py::test_a_slow_body_gets_408_and_an_oversize_one_an_answer",
    ),
    Fault(
        "serving",
        "malformed binary-extension bodies",
        "400 without exception types",
        "tests/test_serving_abuse.py::test_malformed_binary_bodies_get_400_without_exception_types",
    ),
    Fault(
        "serving",
        "tritonclient BYTES (binary and JSON) and FP32",
        "all answered",
        "tests/test_serving_abuse.py::test_the_reference_client_works_in_every_form",
    ),
    Fault(
        "serving",
        "model repository unload/load",
        "REST 403, gRPC PERMISSION_DENIED",
        "tests/test_serving_abuse.py::test_the_model_repository_api_is_closed",
    ),
    Fault(
        "serving",
        "model unloaded (repository API opened on purpose)",
        "readiness 503",
        "tests/test_serving_abuse.py::test_readiness_is_false_once_the_model_is_unloaded",
    ),
    Fault(
        "serving",
        "model_version query; malformed :explain",
        "routed (404 naming the served version); 400 naming the problem",
        "tests/test_serving_abuse.py::test_versions_are_routed_and_bad_explain_input_is_a_400",
    ),
    Fault(
        "serving",
        "schemathesis over /openapi.json (40 s)",
        "no 5xx",
        "tests/test_serving_abuse.py::test_fuzzing_the_openapi_description_finds_no_server_error",
    ),
    Fault(
        "security",
        "placeholder, missing or shared credentials",
        "rendering refuses them",
        "tests/test_manifests.py::test_rendering_refuses_missing_placeholder_and_shared_credentials",
    ),
    Fault(
        "security",
        "a pod that is not restricted",
        "every rendered pod is checked against the restricted profile",
        "tests/test_manifests.py::test_every_pod_runs_restricted",
    ),
    Fault(
        "security",
        "a pod that is not a client of object storage",
        "the NetworkPolicy keeps it off MinIO",
        "tests/test_manifests.py::test_only_the_clients_of_object_storage_reach_minio",
    ),
    Fault(
        "security",
        "an RBAC verb the code does not use",
        "fails the test (verbs recorded from the emulator)",
        "tests/test_manifests.py::test_rbac_grants_exactly_the_verbs_the_code_uses",
    ),
    Fault(
        "security",
        "the shipped InferenceService cannot start",
        "started in a sandbox as the cluster would; becomes ready",
        "tests/test_containers.py::test_the_shipped_inferenceservice_starts",
    ),
    Fault(
        "security",
        "a pipeline step that cannot start from the compiled YAML",
        "ingest runs as its pod; every other step starts and names its missing input",
        "tests/test_containers.py::test_every_other_step_starts_from_the_compiled_yaml",
    ),
]


def markdown() -> str:
    """The README's reliability table."""
    lines = ["| area | fault injected | outcome | test |", "|---|---|---|---|"]
    for item in FAULTS:
        test = item.test.split("::")[1]
        lines.append(f"| {item.area} | {item.fault} | {item.outcome} | `{test}` |")
    return "\n".join(lines)


def run_tests(junit: Path) -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += [f"--junitxml={junit}", *sorted({item.test for item in FAULTS})]
    return subprocess.run(command, cwd=REPO).returncode


def outcomes(junit: Path) -> dict[str, tuple[str, float]]:
    """Per test function (parameters folded): 'passed'/'failed'/'skipped' and seconds."""
    results: dict[str, tuple[str, float]] = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{module}::{case.get('name', '').split('[')[0]}"
        state = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            state = "failed"
        elif case.find("skipped") is not None:
            state = "skipped"
        before, seconds = results.get(node, ("passed", 0.0))
        worst = max(before, state, key=["passed", "skipped", "failed"].index)
        results[node] = (worst, seconds + float(case.get("time", 0)))
    return results


def load_figures() -> dict[str, Any] | None:
    path = RESULTS_DIR / "load.json"
    return json.loads(path.read_text()) if path.exists() else None


def record(results: dict[str, tuple[str, float]]) -> dict[str, Any]:
    faults = [
        asdict(item)
        | {"result": results.get(item.test, ("not run", 0.0))[0]}
        | {"seconds": round(results.get(item.test, ("", 0.0))[1], 2)}
        for item in FAULTS
    ]
    counts: dict[str, int] = {}
    for fault in faults:
        counts[fault["result"]] = counts.get(fault["result"], 0) + 1
    load = load_figures() or {}
    shown = ("figures", "goals", "goals_met", "measured_at")
    return {
        "benchmark": "reliability",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "faults": faults,
        "counts": counts,
        "all_survived": counts.get("passed", 0) == len(faults),
        "load_test": {key: load[key] for key in shown if key in load}
        if load
        else "not measured: run make bench-load",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_reliability")
    parser.add_argument("--markdown", action="store_true", help="print the README table only")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "reliability.json")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown())
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        run_tests(junit)
        result = record(outcomes(junit))
    write_json(result, args.out)
    print(f"{result['counts']} of {len(FAULTS)} faults; wrote {args.out}")
    return 0 if result["all_survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
