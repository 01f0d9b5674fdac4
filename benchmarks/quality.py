"""Quality benchmark (issue 7): `python benchmarks/quality.py --help`, same as `entropykv-fx bench quality`.

The harness lives in entropykv_fx/bench/ so the installed CLI can run it too.
"""

import sys

from entropykv_fx.bench.quality import main

if __name__ == "__main__":
    sys.exit(main())
