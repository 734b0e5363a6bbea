"""Side-by-side benchmarks of halokit against TRL (``make bench``; see benchmarks/README.md)."""
