"""The user-facing commands beyond run: inspect, validate, verify, show, plan, export, sample data, the run log."""
