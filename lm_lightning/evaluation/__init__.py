"""Benchmark tasks through EleutherAI's lm-evaluation-harness: ``evaluate``, a callback, local tasks.

``lm_eval`` is an optional dependency (``pip install -e ".[eval]"``), imported only when a task is run.
"""
