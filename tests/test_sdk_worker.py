"""The PROCESS-environment boot (pipelines/sdk_worker.py) against a real provision service: the
environment it builds is what Beam's sdk_worker_main accepts. The whole path (TaskManagers starting these
workers) runs in tests/test_engines.py on the standalone Flink cluster."""

from __future__ import annotations

from concurrent import futures

import grpc
from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc, endpoints_pb2
from apache_beam.runners.worker import sdk_worker_main
from google.protobuf import struct_pb2

from pipelines import sdk_worker


class _Provision(beam_provision_api_pb2_grpc.ProvisionServiceServicer):
    def __init__(self):
        self.worker_ids = []

    def GetProvisionInfo(self, request, context):
        self.worker_ids.append(dict(context.invocation_metadata()).get("worker_id"))
        options = struct_pb2.Struct()
        options.update({"beam:option:job_name:v1": "sdk-worker-test", "beam:option:experiments:v1": ["x"]})
        return beam_provision_api_pb2.GetProvisionInfoResponse(
            info=beam_provision_api_pb2.ProvisionInfo(
                pipeline_options=options,
                control_endpoint=endpoints_pb2.ApiServiceDescriptor(url="localhost:1234"),
                logging_endpoint=endpoints_pb2.ApiServiceDescriptor(url="localhost:1235"),
                runner_capabilities=["beam:protocol:control_response_elements_embedding:v1"],
            )
        )


def test_boot_environment_from_a_provision_service(tmp_path):
    servicer = _Provision()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    beam_provision_api_pb2_grpc.add_ProvisionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        info = sdk_worker.provision_info(f"localhost:{port}", "7-1")
    finally:
        server.stop(None)
    assert servicer.worker_ids == ["7-1"]  # the runner knows which worker asks
    env = sdk_worker.harness_environment(info, "7-1", str(tmp_path))
    assert env["WORKER_ID"] == "7-1" and env["SEMI_PERSISTENT_DIRECTORY"] == str(tmp_path)
    assert 'url: "localhost:1234"' in env["CONTROL_API_SERVICE_DESCRIPTOR"]
    assert env["RUNNER_CAPABILITIES"] == "beam:protocol:control_response_elements_embedding:v1"
    options = sdk_worker_main._load_pipeline_options(env["PIPELINE_OPTIONS"])
    assert options["job_name"] == "sdk-worker-test" and options["experiments"] == ["x"]
    # Beam's harness accepts the environment as it stands (dry run: builds everything but connects nowhere).
    env.pop("LOGGING_API_SERVICE_DESCRIPTOR")  # nothing listens there
    sdk_worker_main.create_harness(env, dry_run=True)
