"""One entry module per ``ktflow`` command: argparse plus a call into its family package."""
