"""Evaluation: RULER, long-document QA and long-form fidelity tasks, their metrics, the runner that applies
every method x budget to one prefill per sample, and the report (tables with intervals, plots)."""
