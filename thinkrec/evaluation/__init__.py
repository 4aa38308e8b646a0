"""Metrics (AUC, UAUC, ranking, warm / cold) and reporting (plots, model cards)."""
