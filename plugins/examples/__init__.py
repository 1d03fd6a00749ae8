"""Example plugins for plugin authors: small, complete and tested."""
