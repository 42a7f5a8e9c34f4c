"""Training support: on-the-fly data degradations for the ``resshift train`` command."""
