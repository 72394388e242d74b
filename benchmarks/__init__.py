"""Speed and memory benchmarks of every backend on random-weight checkpoints (`benchmarks.bench`)."""
