"""Tests mirror the source layout: tests/PACKAGE/ holds the tests of dr_pipeline/PACKAGE/."""
