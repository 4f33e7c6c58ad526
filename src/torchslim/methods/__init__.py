"""Built-in methods. Every module below is imported by the registry on first use, so a new
method is a new file here: a config class and a handler decorated with ``register_method``."""
