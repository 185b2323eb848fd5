"""Built-in capsgan plugins (installed as ``capsgan_plugins``).

Each module registers its components through the ``capsgan`` entry-point group and
the public :data:`capsgan_toolkit.hookimpl`, exactly as a third-party plugin does.
"""
