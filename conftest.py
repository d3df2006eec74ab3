# Puts the repository root on sys.path for pytest (the package is run in place, not installed).
