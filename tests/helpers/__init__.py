"""Programs the tests run as child processes (each a plain script, run by its path)."""
