"""Op registration (torch.library custom ops) and the functional API, one module per family."""
