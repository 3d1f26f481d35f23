"""Run the omnitalk benchmark (the same as `omnitalk bench`); prints the table, --json FILE writes JSON.

    python benchmarks/bench.py --preset mini-omni2 --random-weights --mode all --baseline --json bench.json
    python benchmarks/bench.py --checkpoint checkpoint/ --mode int8 --quality

See docs/performance.md for what each row means and the recorded runs.
"""
import sys

from omnitalk.bench import main

if __name__ == "__main__":
    sys.exit(main())
