"""Training-framework integrations, each in its own module and imported only by name:
``mmmod.integrations.lightning`` (PyTorch Lightning), ``mmmod.integrations.hf`` (the Hugging
Face ``Trainer``). ``import mmmod`` imports neither framework; accelerate needs no module (see
docs/integrations.md: ``mmmod.unwrap`` on the prepared optimizer)."""
