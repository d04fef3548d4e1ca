"""One entry module per ``ktflow <command>``: its arguments, and a call into the step's package."""
