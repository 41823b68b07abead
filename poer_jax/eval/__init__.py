"""Evaluation: pass@k / avg@k estimators (``passk``)."""
