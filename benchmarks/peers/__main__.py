"""`python -m sdrt.benchmarks.peers`: see compare.py."""

from sdrt.benchmarks.peers.compare import main

if __name__ == "__main__":
    main()
