"""A helper package inside the bundle: the bundle root is on the worker's sys.path."""
