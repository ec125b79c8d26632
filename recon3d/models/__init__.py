"""nn.Modules with config dataclasses, loadable from their published checkpoints."""
