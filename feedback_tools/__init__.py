"""Developer tools around the pipeline: the synthetic traffic generator, its user-agent sample data
and the demo. Not shipped to workers (setup.py excludes this package); run from the repository root,
e.g. `python -m feedback_tools.demo`.
"""
