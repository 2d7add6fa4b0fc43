"""``python -m bench``: run the whole benchmark with one command."""

from bench.run import main

raise SystemExit(main())
