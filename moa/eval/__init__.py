"""Evaluation of adapters and routers on the built-in domains.

``evaluate`` runs every configuration (base, each adapter, oracle routing, the learned
gate, a uniform mixture) in mixed batches; ``write_report`` writes JSON, Markdown and
PNG plots. Used by ``moa eval`` and ``moa demo``.
"""

from moa.eval.report import render_markdown, write_report
from moa.eval.runner import EvalConfig, evaluate, generate_answers, score_examples

__all__ = ["EvalConfig", "evaluate", "generate_answers", "render_markdown", "score_examples", "write_report"]
