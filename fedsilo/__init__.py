"""fedsilo: privacy-preserving federated learning for institutions (Flower SecAgg+, Opacus DP-SGD).

The repository's folders ``common/``, ``client/``, ``server/``, ``simulations/`` and
``runtime/`` are this package's subpackages (pyproject.toml's ``package-dir``); this
folder links to them so that tools reading the clone see the installed names.
"""
