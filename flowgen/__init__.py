"""flowgen: exact-likelihood image generation with normalizing flows (Glow, RealNVP, MAF/IAF, TarFlow, CNF).

The packages, lowest layer first (a module imports only its own layer and those below; tests/test_layout.py
checks it): ``errors``, ``checks``; ``likelihood``, ``transforms``, ``data``, ``checkpoints``; ``flows``;
``dequantization``; ``models``; the features on the model contract (``evaluation``, ``sampling``, ``latents``,
``attributes``, ``ood``, ``sample_quality``, ``performance``); ``training``; ``config`` (the typed schemas);
``build`` (config -> module, checkpoint -> restored run); the tools ``benchmark`` and ``playground``; ``cli``
(the entry points' bodies). Each package's docstring says what it owns and what it may import.
"""

__version__ = "0.1.0"
