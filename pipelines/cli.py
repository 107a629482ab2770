"""Former home of the launcher helpers; they live in pipelines/launcher.py. Re-exported for the jobs
that still import them from here (pipelines/streaming.py)."""
from pipelines.launcher import EXIT_ACCOUNTING, EXIT_CONFIG, EXIT_OK, add_overwrite_flag, pipeline_options, run_main  # noqa: F401
