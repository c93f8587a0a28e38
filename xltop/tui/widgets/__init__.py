"""The TUI's widgets, one per module; each renders part of a Snapshot and nothing else."""
