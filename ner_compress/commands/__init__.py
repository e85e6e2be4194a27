"""What ``tools/`` runs: one function per stage command (flags, artifact checks, the stage) and the whole
pipeline (every stage in order, side by side where the cores allow, then the benchmark)."""
