"""turnrelay: a STUN/TURN relay served by twistd."""
__version__ = "0.1.0"
SOFTWARE = f"turnrelay {__version__}"
