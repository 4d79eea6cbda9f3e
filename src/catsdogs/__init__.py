"""catsdogs: tell cats from dogs in photos uploaded to pet adoption platforms."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("catsdogs")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"


class CatsdogsError(Exception):
    """An expected failure with a message that tells the user what to do; the CLI prints it on one line."""
