"""Evaluation: answer extraction and grading (``answers``), pass@k / avg@k estimators (``passk``)."""
