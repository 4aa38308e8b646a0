"""Training plumbing around the model: the Trainer subclass, backbones, the load path, resume checks."""
