"""Implicit-feedback pipeline on Apache Beam.

`pipelines/` and `transforms/` are the packages shipped to workers (`--setup_file ./setup.py`), with
`feedback_report/` (the HTML report renderer, used by the batch/evaluate launchers only). `feedback_tools/`
(generator, demo, sample user agents) is developer tooling run from the repository root and never shipped.
The Beam version must match the one in templates/ Dockerfiles and .ci/bootstrap.
"""

import setuptools

BEAM_VERSION = "2.77.0"

setuptools.setup(
    name="implicit-feedback-pipeline",
    version="0.1.0",
    description="Implicit-feedback events -> training labels, features and signal-quality figures, on Apache Beam",
    packages=setuptools.find_packages(exclude=["tests*", "benchmarks*", "feedback_tools*"]),
    python_requires=">=3.10",
    install_requires=[
        f"apache-beam[gcp]=={BEAM_VERSION}",
        "fastavro>=1.9",
        "orjson>=3.9",
        "pyyaml>=6.0",
        "pydantic>=2.6",
        "numpy>=1.26",
        "ua-parser[regex]>=1.0.1",
        "crawler-user-agents>=1.0",
        "pyarrow>=14",  # Parquet feature files
        "redis>=5",  # online feature store
        "cramjam>=2.7",  # snappy-compressed Avro input (fastavro's snappy codec)
        "phonenumbers>=8.13",  # phone numbers in free text (privacy)
    ],
    # The PROCESS-environment boot for a cluster's SDK workers (pipelines/sdk_worker.py).
    entry_points={"console_scripts": ["feedback-sdk-worker=pipelines.sdk_worker:main"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "fake-useragent==2.2.0",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "kafka-python==3.0.12",
        ],
    },
)
