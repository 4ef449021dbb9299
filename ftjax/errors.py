"""The one exception type ftjax raises for bad input: the CLI prints its message on one line."""


class FtjaxError(Exception):
    """A user-facing problem (bad config, missing file or column, bad labels...)."""
