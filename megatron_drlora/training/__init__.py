"""The training entry point's pieces: flags, checkpoints, logging and the loop."""
