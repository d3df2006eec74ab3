from tests.fakes import fake_openai  # noqa: F401  (fixture for every test)
# Puts the repository root on sys.path for pytest (the package is run in place, not installed).
