"""One module per ``qlora`` sub-command."""
