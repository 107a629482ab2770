"""The HTML quality/evaluation report renderer. Launcher-side only: the batch and evaluate jobs call it
after the pipeline has finished; no DoFn imports it. It is its own package (not part of `pipelines/`)
and stays installed by setup.py because the Flex Template launcher image runs those jobs.
"""
