"""Subcommands of the ``napari-sam`` command line (see :mod:`napari_sam.cli`)."""
