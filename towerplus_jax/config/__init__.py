"""Stage configs: the key table, the stage builders and the checks."""
