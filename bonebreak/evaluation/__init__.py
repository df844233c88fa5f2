"""Measuring a model honestly: metrics with bootstrap intervals, calibration (temperature and the X-ray check's
threshold, fitted on validation), per-split reports, plots and the model card written from measured numbers."""
