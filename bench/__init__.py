"""homeport's benchmark: the same nginx upstream measured directly and through a real tunnel.

``python -m bench`` (or ``make bench``) installs nginx, wrk and curl when they
are missing, starts its own nginx and a real ``homeport server`` and
``homeport client`` on 127.0.0.1, measures both paths with wrk and curl, prints
a table of figures with their tunnel/direct ratios and writes the same figures
as JSON under ``bench/results/``. See ``bench/README.md``.
"""
