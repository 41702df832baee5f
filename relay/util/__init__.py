"""Small helpers every layer may use: TOML and secret files, time and unit formats, argument
strings.  Imports nothing from relay."""
