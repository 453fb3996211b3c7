"""Evaluation harness: prompt suites, sweeps (resumable, data-parallel under Accelerate), metrics and reports.

* :mod:`unbleed.eval.suites` — benchmark prompt lists behind one name each (``attend-excite:animals``, ``dvmp``…).
* :mod:`unbleed.eval.metrics` — Attend-and-Excite's CLIP and BLIP metrics on transformers models.
* :mod:`unbleed.eval.sweep` — ``unbleed sweep``: prompt × seed × method → images and one record per image.
* :mod:`unbleed.eval.report` — ``unbleed report``: the Table-1-shaped table, bar plots and image grids.
"""
