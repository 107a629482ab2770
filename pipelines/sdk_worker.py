"""Boot a Python SDK harness for Beam's PROCESS environment (what Beam's Go `boot` does in its container).

A portable runner (Flink's TaskManagers, Prism) starts one process per SDK worker with
`COMMAND --id=WORKER_ID --provision_endpoint=HOST:PORT [--semi_persist_dir=DIR]`. This entry point asks
the provision service for the job's pipeline options and the control/logging endpoints, then runs Beam's
own `sdk_worker_main` in this process. Installed as the `feedback-sdk-worker` console script:

    --environment_type=PROCESS --environment_config='{"command": "/path/to/venv/bin/feedback-sdk-worker"}'

Unlike Beam's boot it installs nothing: the project and its dependencies must already be installed in the
interpreter that runs this script on every worker host (the same venv as the launcher on one machine).

Why not LOOPBACK on a cluster: every TaskManager JVM numbers its SDK workers from the same static counter
(`DefaultJobBundleFactory`: "1-1", "2-1", ...), and LOOPBACK's single worker pool keys workers by that id,
so one TaskManager's StopWorker ends another TaskManager's harness ("SDK harness closed connection").
With PROCESS every TaskManager owns the processes it starts.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from google.protobuf import json_format, text_format


def provision_info(endpoint: str, worker_id: str):
    """The job's ProvisionInfo from the runner's provision service (the worker id goes in gRPC metadata)."""
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        response = stub.GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=[("worker_id", worker_id)], timeout=60
        )
    return response.info


def harness_environment(info, worker_id: str, semi_persist_dir: str | None) -> dict:
    """The environment variables Beam's `sdk_worker_main` reads, from a ProvisionInfo."""
    env = {
        "WORKER_ID": worker_id,
        "PIPELINE_OPTIONS": json_format.MessageToJson(info.pipeline_options),
        "CONTROL_API_SERVICE_DESCRIPTOR": text_format.MessageToString(info.control_endpoint),
        "LOGGING_API_SERVICE_DESCRIPTOR": text_format.MessageToString(info.logging_endpoint),
        "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities),
    }
    if info.HasField("status_endpoint"):
        env["STATUS_API_SERVICE_DESCRIPTOR"] = text_format.MessageToString(info.status_endpoint)
    if semi_persist_dir:
        env["SEMI_PERSISTENT_DIRECTORY"] = semi_persist_dir
    return env


def main(argv: list | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--id", required=True, help="worker id assigned by the runner")
    ap.add_argument("--provision_endpoint", required=True)
    ap.add_argument("--semi_persist_dir")
    # Endpoints some runners also pass; the provision service is authoritative.
    for flag in ("--logging_endpoint", "--artifact_endpoint", "--control_endpoint"):
        ap.add_argument(flag)
    args, _unknown = ap.parse_known_args(argv)
    if args.semi_persist_dir:
        os.makedirs(args.semi_persist_dir, exist_ok=True)
    info = provision_info(args.provision_endpoint, args.id)
    os.environ.update(harness_environment(info, args.id, args.semi_persist_dir))

    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
