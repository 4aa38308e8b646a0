"""The ThinkRec library: data preparation, collaborative encoders, training, evaluation and reasons.

The model's own code (what a checkpoint carries for `trust_remote_code`) is not here: it is the flat
set of `*_thinkrec.py` files at the repository root, which import only each other. This package may
import them; they never import this package.
"""

__version__ = "0.3.0"
