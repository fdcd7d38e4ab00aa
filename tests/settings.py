"""Values shared by the test suites."""

API_KEY = "sk-test-0123456789"  # the guarded test app's key (tests/integration/test_reliability.py)
