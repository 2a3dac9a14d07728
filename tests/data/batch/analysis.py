# The script the golden job scripts (tests/batch_golden.rs) run; only its path matters.
