"""Evaluation: batched generation, task scorers, prompted baseline, lm-eval regression, safety, judge.

Each module has one job; ``suite.py`` composes them into the per-system evaluation the
``eval-base`` and ``eval`` stages run. Nothing here imports DVC.
"""
