"""Developer tools shipped with pyattn (static GPU checks)."""
