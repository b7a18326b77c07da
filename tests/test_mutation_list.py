"""The mutation list stays in step with the code: every edit applies, every named test exists."""

from tests.mutations import MUTATIONS, stale, missing_tests


def test_every_mutation_applies_to_todays_code():
    assert stale(MUTATIONS) == []


def test_every_named_test_file_exists():
    assert missing_tests(MUTATIONS) == []
