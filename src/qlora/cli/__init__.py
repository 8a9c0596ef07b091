"""The ``qlora`` command."""
