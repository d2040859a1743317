"""The project's tests: one package, so a test module imported by another keeps one name (tests.test_x)."""
