"""homeport's composition root: the command line and the demo.

The only package that imports both ``server`` and ``client``.
"""
