"""What every closable ruvpy object shares: `closed`, and `with obj:` that refuses an object
already closed and closes it when the block ends."""


class Closing:
    """Mixin: needs `_closed`, `_check_open()` (raises when closed) and `close()`."""

    __slots__ = ()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()
