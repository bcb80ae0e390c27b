"""Defaults that several layers share and that must not pull anything in with them (no PIL,
no Beam): the CLI's ``--help``, the launcher and the workers read them alike."""

MAX_IMAGE_BYTES = 50 * 2**20  # the default --max_image_bytes: a larger image fails its record
