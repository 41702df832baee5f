"""Small helpers every layer may use: TOML and secret files, time and unit formats, argument
strings, strong random numbers drawn in blocks.  Imports nothing from relay."""
