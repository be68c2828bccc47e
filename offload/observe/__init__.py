"""Observation: step statistics and timeline, reports, traces and plots, NVML/psutil monitoring,
peak memory and profiler ranges."""
